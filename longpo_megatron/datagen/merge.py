"""Stage ``merge``: join the records of all finished shards into one training file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longpo_megatron.data.records import DataError, read_records, records_to_jsonl
from longpo_megatron.datagen.config import DatagenConfig, parse_shard
from longpo_megatron.datagen.store import Manifest, write_atomic


def add_reports(total: Any, part: Any) -> Any:
    """Sum counts key by key (nested dicts too); lists are concatenated; rates are dropped."""
    if isinstance(total, dict) and isinstance(part, dict):
        out = dict(total)
        for key, value in part.items():
            if key.endswith("_per_s"):
                continue
            out[key] = add_reports(out[key], value) if key in out else value
        return out
    if isinstance(total, list) and isinstance(part, list):
        return total + part
    if isinstance(total, (int, float)) and isinstance(part, (int, float)):
        return total + part
    return total


def merge_shards(cfg: DatagenConfig) -> dict[str, Any]:
    """Check every shard of ``n`` finished, then write records.jsonl + report.json.

    The shard files are read back through the training reader (schema validation), and ids
    must be unique over all shards.
    """
    from longpo_megatron.datagen.pipeline import StageStateError, shard_dirname, summary_line

    _, count = parse_shard(cfg.shard)
    root = Path(cfg.output_dir)
    dirs = [root / shard_dirname(i, count) for i in range(count)]
    missing = [str(d) for d in dirs if not Manifest(d / "manifest.json").complete("records")]
    if missing:
        raise StageStateError(
            f"merge: {len(missing)} of {count} shards are not finished: {missing}"
        )
    records, report, owner = [], {"shards": count}, {}
    for d in dirs:
        shard_records, _ = read_records(d / "records.jsonl", policy="error")
        for rec in shard_records:
            if rec.id in owner:
                raise DataError(f"merge: record id {rec.id!r} is in {owner[rec.id]} and {d}")
            owner[rec.id] = str(d)
        records += shard_records
        part = json.loads((d / "report.json").read_text(encoding="utf-8"))
        part.pop("shard", None)
        part.pop("dir", None)
        report = add_reports(report, part)
    write_atomic(root / "records.jsonl", records_to_jsonl(records).encode("ascii"))
    text = json.dumps(report, indent=1, sort_keys=True) + "\n"
    write_atomic(root / "report.json", text.encode("ascii"))
    print(f"[datagen merge] {len(records)} records from {count} shards; " + summary_line(report))
    return report
