"""HF checkpoint directories: a lazy tensor reader and a streaming sharded-safetensors writer.

Nothing here unpickles arbitrary objects: safetensors files are parsed by ``safetensors``, and
legacy ``pytorch_model*.bin`` files only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from longpo_megatron.export.arch import ConversionError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
"""Small files copied verbatim next to exported weights when present."""
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file; errors name the file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def require_dir(path: str | Path, what: str) -> Path:
    """``path`` as an existing directory, else a clear error."""
    p = Path(path)
    if not p.is_dir():
        raise ConversionError(f"{what} {str(p)!r} does not exist or is not a directory")
    return p


class HFWeights:
    """Lazy access to the tensors of an HF model directory, one tensor at a time."""

    def __init__(self, hf_dir: str | Path) -> None:
        self.dir = require_dir(hf_dir, "HF model directory")
        self.weight_map = self._weight_map()
        for fname in sorted(set(self.weight_map.values())):
            if not (self.dir / fname).is_file():
                raise ConversionError(f"{self.dir / fname}: weight file listed but missing")
        self._open: dict[str, Any] = {}

    def _weight_map(self) -> dict[str, str]:
        d = self.dir
        if (d / SAFE_INDEX).is_file():
            return dict(read_json(d / SAFE_INDEX)["weight_map"])
        if (d / "model.safetensors").is_file():
            return dict.fromkeys(self._safe(d / "model.safetensors").keys(), "model.safetensors")
        if (d / BIN_INDEX).is_file():
            return dict(read_json(d / BIN_INDEX)["weight_map"])
        if (d / "pytorch_model.bin").is_file():
            keys = self._bin("pytorch_model.bin").keys()
            return dict.fromkeys(keys, "pytorch_model.bin")
        raise ConversionError(
            f"{d}: no weights found (expected {SAFE_INDEX}, model.safetensors, {BIN_INDEX} "
            "or pytorch_model.bin)"
        )

    @staticmethod
    def _safe(path: Path) -> Any:
        from safetensors import safe_open

        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None

    def _bin(self, fname: str) -> dict[str, Tensor]:
        path = self.dir / fname
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise ConversionError(f"{path}: cannot load with weights_only=True ({e})") from None

    def _handle(self, fname: str) -> Any:
        if fname not in self._open:
            if len(self._open) >= 2:  # keep few files mapped at a time
                self._open.pop(next(iter(self._open)))
            is_safe = fname.endswith(".safetensors")
            self._open[fname] = self._safe(self.dir / fname) if is_safe else self._bin(fname)
        return self._open[fname]

    def keys(self) -> list[str]:
        """Every tensor name in the checkpoint."""
        return list(self.weight_map)

    def file_of(self, name: str) -> Path:
        """The file holding tensor ``name``."""
        return self.dir / self.weight_map[name]

    def get(self, name: str) -> Tensor:
        """Load one tensor (errors name the tensor and its file)."""
        if name not in self.weight_map:
            raise ConversionError(f"{self.dir}: tensor {name!r} not found in any weight file")
        fname = self.weight_map[name]
        h = self._handle(fname)
        try:
            return h.get_tensor(name) if fname.endswith(".safetensors") else h[name]
        except Exception as e:
            where = self.dir / fname
            raise ConversionError(f"{where}: cannot read tensor {name!r} ({e})") from None

    def dtype(self) -> torch.dtype:
        """dtype of the first floating-point tensor (the checkpoint's storage dtype)."""
        for name in self.keys():
            t = self.get(name)
            if t.is_floating_point():
                return t.dtype
        raise ConversionError(f"{self.dir}: no floating-point tensors")


@dataclass
class PlannedTensor:
    """One tensor to write: its name, shape, dtype and a function that produces it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], Tensor]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Greedy, order-preserving split into shards of at most ``max_shard_bytes`` of data.

    A single tensor bigger than the limit gets a shard of its own (as ``transformers`` does).
    """
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


def _header(shard: list[PlannedTensor]) -> bytes:
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        if t.dtype not in _DTYPES:
            raise ConversionError(f"tensor {t.name!r}: dtype {t.dtype} not writable")
        meta[t.name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_shard(path: Path, shard: list[PlannedTensor], tick: Callable[[int], None]) -> None:
    """Write one safetensors file, producing and writing tensors one at a time."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(_header(shard))
        for planned in shard:
            t = planned.produce()
            if tuple(t.shape) != planned.shape or t.dtype != planned.dtype:
                raise ConversionError(
                    f"{path.name}: tensor {planned.name!r} is {tuple(t.shape)} {t.dtype}, "
                    f"planned {planned.shape} {planned.dtype}"
                )
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(data.numpy()))
            tick(planned.nbytes)
            del t, data
    tmp.replace(path)


def write_sharded_safetensors(
    out_dir: str | Path,
    tensors: list[PlannedTensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``; return index.

    Tensors are produced lazily, one at a time, so memory holds one tensor beyond the caller's.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ConversionError("duplicate tensor names in export plan")
    shards = plan_shards(tensors, max_shard_bytes)
    total = sum(t.nbytes for t in tensors)
    weight_map: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="write", disable=not progress) as bar:
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_shard(out / fname, shard, bar.update)
            weight_map.update((t.name, fname) for t in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return index


def copy_tokenizer_files(src: Optional[str | Path], dst: str | Path) -> list[str]:
    """Copy the :data:`TOKENIZER_FILES` that exist in ``src`` into ``dst``; return their names."""
    if src is None:
        return []
    s, d = Path(src), Path(dst)
    d.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (s / name).is_file():
            shutil.copyfile(s / name, d / name)
            copied.append(name)
    return copied
