"""Precomputed reference log-probs: a JSONL file stored beside the data.

Line 1 is a header ``{"format": "longpo-ref-logps", "version": 1, "reference": {...}}`` naming
the reference (architecture, RoPE θ, weights, tokenizer, which prompt it saw). Every other line is
``{"id", "fingerprint", "chosen": [per turn], "rejected": [per turn]}``; ``fingerprint`` is the
sha256 of the exact tokens scored (:func:`~.sequences.fingerprint`). Training with
``reference.mode=precomputed`` refuses a header that names another reference and any record whose
tokens no longer match. While being written, each DP writer appends to its own ``.part`` file
(flushed and fsynced per batch) so a crashed run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

from longpo_megatron.config import Config
from longpo_megatron.data.dataset import PreferenceDataset
from longpo_megatron.errors import UserError
from longpo_megatron.reference.sequences import view_of

FORMAT = "longpo-ref-logps"
VERSION = 1
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
    weights = cfg.reference.load or cfg.checkpoint.load or init + str(
        par.pipeline_model_parallel_size
    )
    return {
        "model": model,
        "weights": str(weights),
        "tokenizer": cfg.data.tokenizer,
        "view": view_of(cfg.longpo.loss),
    }


def part_path(out: Path, dp_rank: int, dp_size: int) -> Path:
    """The append-only file of one DP writer."""
    return out.with_name(f"{out.name}.part{dp_rank:03d}of{dp_size:03d}")


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """JSON objects of a part file; an unterminated last line (a killed write) is dropped."""
    text = path.read_text()
    lines = text.split("\n")
    complete = lines[:-1]  # text after the last newline is partial (or empty)
    return [json.loads(ln) for ln in complete if ln.strip()]


def done_ids(out: Path) -> set[str]:
    """Record ids already written by any writer of ``out``."""
    done: set[str] = set()
    for part in out.parent.glob(f"{out.name}.part*"):
        done |= {row["id"] for row in _read_lines(part)}
    return done


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
            f.write(json.dumps(rows[rid]) + "\n")
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
    lines = path.read_text().splitlines()
    _check_header(path, json.loads(lines[0]) if lines else {}, cfg, identity)
    rows = {}
    for lineno, line in enumerate(lines[1:], start=2):
        row = json.loads(line)
        rows[row["id"]] = (lineno, row)
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
