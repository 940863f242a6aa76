"""A resume on changed data is refused, naming what changed; the override matches reference
scores by record id + token fingerprint, never by row position (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dist_harness import run_distributed

ROOT = Path(__file__).resolve().parents[2]


def _trainer(data: Path, out: Path, load: str | None, allow: bool = False, steps: int = 1):
    from parity_common import parity_config

    from longpo_megatron.config_validation import validate_config
    from longpo_megatron.trainer import Trainer

    cfg = parity_config(1, 1, 1, str(data), str(out / "run"))
    cfg.train.train_iters, cfg.train.global_batch_size = steps, 2
    cfg.checkpoint.save = str(out / "ckpt") if load is None else str(out / "ckpt2")
    cfg.checkpoint.load = load
    cfg.data.cache_dir = str(out / "cache")
    cfg.data.allow_changed_data_on_resume = allow
    return Trainer(cfg, validate_config(cfg, world_size=1, cuda_available=False))


def _scores(trainer) -> dict[str, tuple[float, float]]:
    ds = trainer.dataset
    return {ds.record_id(i): ds.ref_logps(i) for i in range(len(ds))}


def _attempt(data: Path, out: Path, load: str, allow: bool = False) -> Any:
    """Set up a resumed trainer; its scores by id, or the user error's message."""
    from longpo_megatron.errors import UserError

    trainer = _trainer(data, out, load, allow)
    try:
        trainer.setup()
        return {
            "scores": _scores(trainer),
            "order": [trainer.dataset.record_id(i) for i in range(len(trainer.dataset))],
        }
    except UserError as err:
        return str(err)
    finally:
        trainer.close()


def identity_worker(rank: int, world: int, *, tmp: str) -> dict[str, Any]:
    out = Path(tmp)
    lines = (ROOT / "data/toy/preference.jsonl").read_text().splitlines()[:6]
    data = out / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    first = _trainer(data, out, None)
    first.setup().run()
    res: dict[str, Any] = {"scores": _scores(first)}
    first.close()
    ckpt = str(out / "ckpt")
    data.write_text("\n".join(lines[::-1]) + "\n")
    res["reordered"] = _attempt(data, out, ckpt)
    edited = json.loads(lines[2])
    edited["turns"][0]["chosen"] += " (edited)"
    data.write_text("\n".join(lines[:2] + [json.dumps(edited)] + lines[3:]) + "\n")
    res["edited"] = _attempt(data, out, ckpt)
    res["edited_override"] = _attempt(data, out, ckpt, allow=True)
    fresh = _trainer(data, out, None).setup()  # the initial reference scores the edited data
    res["edited_fresh"] = _scores(fresh)
    fresh.close()
    res["edited_override_stored"] = _attempt(data, out, ckpt, allow=True)
    data.unlink()
    renamed = out / "renamed.jsonl"
    renamed.write_text("\n".join(lines[::-1]) + "\n")
    res["renamed_after_reorder"] = _attempt(renamed, out, ckpt)
    res["override"] = _attempt(renamed, out, ckpt, allow=True)
    moved = out / "moved.jsonl"
    moved.write_text("\n".join(lines) + "\n")
    res["renamed_only"] = _attempt(moved, out, ckpt)
    return res


@pytest.mark.slow
def test_changed_data_refused_and_override_keys_by_record(tmp_path) -> None:
    res = run_distributed(identity_worker, 1, timeout_s=600, tmp=str(tmp_path))[0]
    for case in ("reordered", "edited", "renamed_after_reorder"):
        msg = res[case]
        assert isinstance(msg, str), f"{case}: resumed on changed data"
        assert msg.startswith(f"{tmp_path}/ckpt") and "the data changed since" in msg, msg
        assert "source sha256" in msg and "data.allow_changed_data_on_resume=true" in msg, msg
    assert (
        "pairs.jsonl) -> " in res["reordered"] and "renamed.jsonl)" in res["renamed_after_reorder"]
    )
    assert "6 rows hold another record" in res["reordered"]
    assert "1 rows hold another record" in res["edited"]
    # edited + override: the edited record has no scores in the checkpoint and none stored
    assert "1 records of this data have no reference scores" in res["edited_override"]
    assert "toy-0003" in res["edited_override"]
    # ... unless the initial reference's scores are stored beside the edited data
    stored, fresh = res["edited_override_stored"]["scores"], res["edited_fresh"]
    assert stored["toy-0003"] == fresh["toy-0003"] != res["scores"]["toy-0003"]
    assert {k: v for k, v in stored.items() if k != "toy-0003"} == {
        k: v for k, v in res["scores"].items() if k != "toy-0003"
    }
    # reordered + override: every record gets ITS OWN score back (not the row's)
    over = res["override"]
    assert over["order"] == list(reversed(list(res["scores"])))
    assert over["scores"] == res["scores"]
    assert res["renamed_only"]["scores"] == res["scores"]  # same content, new name: allowed
