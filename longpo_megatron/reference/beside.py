"""Reference scores kept beside a prepared dataset, and the data identity of a resume.

``reference.mode=initial_policy`` scores every pair once with the initial weights and stores the
sums in ``<prepared>/reference/<key>.jsonl`` (the ``longpo-ref-logps`` store format, keyed by
record id + token fingerprint, with its header naming the reference). A restarted or requeued run
loads them instead of scoring again; a store of another reference gets another ``key``.

A training checkpoint records the data's identity (:func:`data_identity`) and the reference
table's row keys (``id:fingerprint``). A resume on changed data (reordered, edited, replaced,
renamed after a reorder) is refused naming what changed, unless
``data.allow_changed_data_on_resume``; the table is always restored by key, never by position.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch

from longpo_megatron.config import Config
from longpo_megatron.data.dataset import PreferenceDataset
from longpo_megatron.errors import UserError
from longpo_megatron.reference.sequences import view_of
from longpo_megatron.reference.store import load_store, reference_identity


class DataChangedError(UserError, ValueError):
    """A resume whose data is not the data the checkpoint was trained on."""


def store_beside(dataset: Any, identity: dict[str, Any]) -> Path:
    """Where ``dataset``'s initial-policy scores by the reference ``identity`` live."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return Path(dataset.root) / "reference" / f"initial_policy-{key[:16]}.jsonl"


def score_or_load(scorer_factory, cfg: Config, dataset: Any, batch_pairs: int) -> dict[str, Any]:
    """Load the stored scores beside ``dataset``; score (resumably) and store them if absent.
    Returns the reference identity (a resumed run finds the store again by it).

    ``scorer_factory()`` builds the reference scorer (only called when scoring is needed).
    Collective: every rank calls it.
    """
    from longpo_megatron.reference.cli import precompute

    identity = reference_identity(cfg)
    path = store_beside(dataset, identity)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        precompute(cfg, scorer_factory(), dataset, path, batch_pairs)
    load_store(path, cfg, dataset)
    return identity


def load_beside(cfg: Config, dataset: Any, identity: Optional[dict[str, Any]]) -> Optional[Path]:
    """Fill ``dataset`` from the store of reference ``identity`` beside it; None when absent."""
    has_dir = getattr(dataset, "root", None) is not None
    path = store_beside(dataset, identity) if identity and has_dir else None
    if path is None or not path.is_file():
        return None
    load_store(path, cfg, dataset, identity)
    return path


def data_identity(dataset: Any, cfg: Config) -> dict[str, Any]:
    """What a checkpoint records about its data, plus the reference table's row keys."""
    meta = getattr(dataset, "meta", None) or {}
    source = meta.get("source", {})
    return {
        "identity": meta.get("identity"),
        "source": source.get("path"),
        "source_sha256": source.get("sha256"),
        "records": len(dataset),
        "reference_keys": reference_keys(dataset, view_of(cfg.longpo.loss)),
    }


def reference_keys(dataset: PreferenceDataset, view: str) -> list[str]:
    """``id:fingerprint`` of every pair, in dataset order."""
    return [
        f"{dataset.record_id(i)}:{dataset.pair_fingerprint(i, view)}" for i in range(len(dataset))
    ]


def data_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Readable differences between a checkpoint's data identity and this run's."""
    out = []
    if saved.get("source_sha256") != now.get("source_sha256"):
        out.append(
            f"source sha256 {str(saved.get('source_sha256'))[:12]} ({saved.get('source')}) -> "
            f"{str(now.get('source_sha256'))[:12]} ({now.get('source')})"
        )
    if saved.get("identity") != now.get("identity"):
        out.append(
            f"prepared identity {str(saved.get('identity'))[:12]} -> "
            f"{str(now.get('identity'))[:12]}"
        )
    if saved.get("records") != now.get("records"):
        out.append(f"records {saved.get('records')} -> {now.get('records')}")
    keys_then, keys_now = saved.get("reference_keys") or [], now.get("reference_keys") or []
    if keys_then and keys_then != keys_now:
        moved = sum(a != b for a, b in zip(keys_then, keys_now))
        out.append(f"{moved} rows hold another record or other tokens than before")
    return out


def check_data(
    ckpt: Path, saved: Optional[dict[str, Any]], now: dict[str, Any], allow: bool
) -> None:
    """Refuse a resume on changed data unless ``allow`` (data.allow_changed_data_on_resume)."""
    if not saved:
        return
    changes = data_changes(saved, now)
    if changes and not allow:
        raise DataChangedError(
            f"{ckpt}: the data changed since this checkpoint was saved: {'; '.join(changes)}. "
            "Resuming would pair records with another record's reference scores and data "
            "order; set data.allow_changed_data_on_resume=true to resume anyway (reference "
            "scores are then matched by record id and token fingerprint)"
        )


def restore_table(
    dataset: PreferenceDataset, table: torch.Tensor, keys: Optional[list[str]], view: str
) -> list[int]:
    """Fill ``dataset``'s reference sums from a checkpoint table by row key; returns the pairs
    that found no row. Without keys (an older checkpoint) rows are taken by position."""
    if keys is None:
        dataset.load_ref_state(table)
        return dataset.unscored_indices()
    if len(keys) != table.shape[0]:
        raise DataChangedError(
            f"checkpoint reference table has {table.shape[0]} rows, {len(keys)} keys"
        )
    row_of = {k: r for r, k in enumerate(keys)}
    missing = []
    for i, key in enumerate(reference_keys(dataset, view)):
        r = row_of.get(key)
        chosen, rejected = (float(v) for v in table[r]) if r is not None else (math.nan, math.nan)
        if math.isnan(chosen) or math.isnan(rejected):
            missing.append(i)
            continue
        dataset.set_ref_logps(i, chosen, rejected)
    return missing
