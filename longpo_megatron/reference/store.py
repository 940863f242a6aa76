"""Precomputed reference log-probs: a JSONL file stored beside the data.

Line 1 is a header ``{"format": "longpo-ref-logps", "version": 1, "reference": {...}}`` naming
the reference (architecture, RoPE θ, weights, tokenizer, which prompt it saw). Every other line is
``{"id", "fingerprint", "chosen": [per turn], "rejected": [per turn], "checksum"}``;
``fingerprint`` is the sha256 of the exact tokens scored (:func:`~.sequences.fingerprint`) and
``checksum`` covers the id and the stored values (:func:`row_checksum`). Training with
``reference.mode=precomputed`` refuses a header that names another reference, any record whose
tokens no longer match, an edited value, a second row for one id and any unreadable line, naming
the file and the line. While being written, each DP writer appends to its own ``.part`` file
(flushed and fsynced per batch) so a crashed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from longpo_megatron.config import Config
from longpo_megatron.data.dataset import PreferenceDataset
from longpo_megatron.errors import UserError
from longpo_megatron.reference.sequences import view_of

FORMAT = "longpo-ref-logps"
VERSION = 2
"""2: rows carry a ``checksum`` over their values."""
POLICY_ONLY = ("name", "rotary_base", "recompute", "attention_backend", "init_method_std")
"""ModelConfig fields that do not change the reference's numbers."""


class ReferenceStoreError(UserError, ValueError):
    """A stored reference score that cannot be used (names the file, line or record)."""


def reference_identity(cfg: Config) -> dict[str, Any]:
    """What must match between the stored scores and a training run."""
    model = {k: v for k, v in vars(cfg.model).items() if k not in POLICY_ONLY}
    model["reference_rotary_base"] = cfg.model.reference_rotary_base or cfg.model.rotary_base
    par = cfg.parallel  # a random init depends on the layout, loaded weights do not
    init = f"random init, seed {cfg.train.seed}, tp {par.tensor_model_parallel_size}, pp "
    weights = (
        cfg.reference.load or cfg.checkpoint.load or init + str(par.pipeline_model_parallel_size)
    )
    return {
        "model": model,
        "weights": str(weights),
        "tokenizer": cfg.data.tokenizer,
        "view": view_of(cfg.longpo.loss),
    }


def row_checksum(row: dict[str, Any]) -> str:
    """sha256 (32 hex digits) over the row's id and exact stored values (edits are refused)."""
    body = json.dumps([row["id"], row["chosen"], row["rejected"]], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()[:32]


def is_store(path: Path) -> bool:
    """Whether ``path`` starts with the header line of a reference store (any version)."""
    try:
        with open(path, "rb") as f:
            head = json.loads(f.readline(1 << 20).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(head, dict) and head.get("format") == FORMAT


def part_path(out: Path, dp_rank: int, dp_size: int) -> Path:
    """The append-only file of one DP writer."""
    return out.with_name(f"{out.name}.part{dp_rank:03d}of{dp_size:03d}")


def _parse_row(line: str, path: Path, lineno: int) -> dict[str, Any]:
    """One score row, its shape checked; any problem names the file and the line."""
    try:
        row = json.loads(line)
        ok = isinstance(row, dict) and isinstance(row["id"], str)
        ok = ok and isinstance(row["fingerprint"], str)
        for side in ("chosen", "rejected"):
            values = row[side]
            ok = ok and isinstance(values, list) and len(values) > 0
            ok = ok and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
    except json.JSONDecodeError as e:
        raise ReferenceStoreError(f"{path}, line {lineno}: malformed JSON ({e.msg})") from None
    except KeyError as e:
        raise ReferenceStoreError(f"{path}, line {lineno}: row has no {e} field") from None
    except TypeError:
        ok = False
    if not ok:
        raise ReferenceStoreError(
            f"{path}, line {lineno}: not a score row (needs a string id and fingerprint and "
            "non-empty lists of finite numbers 'chosen' and 'rejected')"
        )
    return row


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """Rows of a part file; an unterminated last line (a killed write) is dropped."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ReferenceStoreError(f"{path}: not UTF-8 text (byte {e.start})") from None
    lines = text.split("\n")[:-1]  # text after the last newline is partial (or empty)
    return [_parse_row(ln, path, i) for i, ln in enumerate(lines, start=1) if ln.strip()]


def done_ids(out: Path) -> set[str]:
    """Record ids already written by any writer of ``out``."""
    done: set[str] = set()
    for part in out.parent.glob(f"{out.name}.part*"):
        done |= {row["id"] for row in _read_lines(part)}
    return done


def check_output(out: Path, data_path: str) -> None:
    """Refuse an output path that would destroy something: the data file itself, a directory,
    or any existing file that is not a reference store (checked by its header line)."""
    where = f"reference.path={str(out)!r}"
    if out.is_dir():
        raise ReferenceStoreError(f"{where}: is a directory; name the output .jsonl file")
    data = Path(data_path)
    if out.exists() and data.exists() and os.path.samefile(out, data):
        raise ReferenceStoreError(
            f"{where}: is the input data file (data.path={data_path!r}); the scores would "
            "overwrite the training data. Write them to a new file"
        )
    if out.exists() and not is_store(out):
        raise ReferenceStoreError(
            f"{where}: exists and is not a {FORMAT} store (its first line is not a store "
            "header); refusing to overwrite it. Remove it or choose a new file"
        )


def _drop_torn_tail(path: Path) -> None:
    """Cut a line a killed writer left unterminated, so appends start on a fresh line."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def append_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows durably (flush + fsync) so a kill loses at most the batch in flight."""
    _drop_torn_tail(path)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def merge_parts(out: Path, header: dict[str, Any], order: list[str]) -> int:
    """Write ``out`` (header + rows in dataset order) atomically, then delete the parts."""
    rows: dict[str, dict[str, Any]] = {}
    parts = sorted(out.parent.glob(f"{out.name}.part*"))
    for part in parts:
        rows.update({row["id"]: row for row in _read_lines(part)})
    missing = [i for i in order if i not in rows]
    if missing:
        raise ReferenceStoreError(f"{out}: {len(missing)} records unscored, e.g. {missing[:3]}")
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(header) + "\n")
        for rid in order:
            row = {k: v for k, v in rows[rid].items() if k != "checksum"}
            f.write(json.dumps({**row, "checksum": row_checksum(row)}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    for part in parts:
        part.unlink()
    return len(order)


def header_for(cfg: Config) -> dict[str, Any]:
    """The header line of a store made under ``cfg``."""
    return {"format": FORMAT, "version": VERSION, "reference": reference_identity(cfg)}


def _check_header(
    path: Path, header: dict[str, Any], cfg: Config, identity: Optional[dict[str, Any]] = None
) -> None:
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ReferenceStoreError(
            f"{path}, line 1: not a {FORMAT} v{VERSION} file (header {header!r:.200})"
        )
    want, got = identity or reference_identity(cfg), header.get("reference", {})
    diff = [k for k in want if want[k] != got.get(k)]
    if diff:
        details = "; ".join(f"{k}: stored {got.get(k)!r} vs run {want[k]!r}" for k in diff)
        raise ReferenceStoreError(
            f"{path}: reference log-probs were computed by another reference ({details}); "
            "recompute them with longpo-ref-logps"
        )


def _read_rows(path: Path, lines: list[str]) -> dict[str, tuple[int, dict[str, Any]]]:
    """id -> (line, row) of a finished store: each row parsed, checksummed and unique."""
    rows: dict[str, tuple[int, dict[str, Any]]] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        row = _parse_row(line, path, lineno)
        if row.get("checksum") != row_checksum(row):
            raise ReferenceStoreError(
                f"{path}, line {lineno}, record {row['id']!r}: values do not match the row's "
                "checksum (the stored scores were edited); recompute them with longpo-ref-logps"
            )
        if row["id"] in rows:
            raise ReferenceStoreError(
                f"{path}, line {lineno}: second row for record {row['id']!r} (first on line "
                f"{rows[row['id']][0]})"
            )
        rows[row["id"]] = (lineno, row)
    return rows


def load_store(
    path: str | Path,
    cfg: Config,
    dataset: PreferenceDataset,
    identity: Optional[dict[str, Any]] = None,
) -> None:
    """Verify ``path`` against the run (or the reference ``identity`` a resumed run recorded)
    and the data, then fill ``dataset``'s reference sums."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceStoreError(f"reference.path={str(path)!r}: no such file")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
        header = json.loads(lines[0]) if lines else {}
    except (UnicodeDecodeError, ValueError):
        header = {}
    _check_header(path, header if isinstance(header, dict) else {}, cfg, identity)
    rows = _read_rows(path, lines)
    view = view_of(cfg.longpo.loss)
    for i in range(len(dataset)):
        record_id = dataset.record_id(i)  # no token reads: prepared data stores fingerprints
        if record_id not in rows:
            raise ReferenceStoreError(f"{path}: no reference log-probs for record {record_id!r}")
        lineno, row = rows[record_id]
        if row["fingerprint"] != dataset.pair_fingerprint(i, view):
            raise ReferenceStoreError(
                f"{path}, line {lineno}, record {record_id!r}: stored log-probs were computed "
                "on other tokens (edited record, other tokenizer/template, or other loss view)"
            )
        dataset.set_ref_logps(i, float(sum(row["chosen"])), float(sum(row["rejected"])))
