"""The in-training needle probe (``train.eval_interval``) at world 2 under TP, PP and CP.

Its per-row answer log-probabilities and greedy checks are compared with the independent
plain-PyTorch reference (tests/reference_impl.py) run on the gathered full weights, and a short
training run with ``train.eval_interval=1`` logs the probe's metrics at every step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_harness import run_distributed
from gather import gather_full_state
from parity_common import TINY, parity_config, ref_config
from reference_impl import from_megatron_state_dict

from longpo_megatron.data.tokenizer import ByteChatTokenizer
from longpo_megatron.eval.probe import PROBE_DEPTHS, probe_rows

ROOT = Path(__file__).resolve().parents[2]
LENGTH = 1024
"""data.max_seq_length of the toy data (the probe runs at the training length)."""


def probe_worker(rank: int, world: int, *, tp: int, pp: int, cp: int, data: str, out: str):
    from longpo_megatron.config_validation import validate_config
    from longpo_megatron.eval.probe import NeedleProbe
    from longpo_megatron.trainer import Trainer

    cfg = parity_config(tp, pp, cp, data, out)
    cfg.train.train_iters, cfg.train.eval_interval = 2, 1
    assert cfg.data.max_seq_length == LENGTH
    trainer = Trainer(cfg, validate_config(cfg, world_size=world, cuda_available=False)).setup()
    probe = NeedleProbe.for_trainer(trainer)
    results = probe.results(trainer.model)
    full = gather_full_state(trainer.model, trainer.groups, num_layers=cfg.model.num_layers)
    trainer.run()
    logging_rank = trainer.groups.is_logging_rank
    trainer.close()
    return {"results": results, "rows": probe.rows, "full": full, "logging": logging_rank}


def reference(full: dict, rows) -> list[tuple[float, bool]]:
    """Σ answer log-probs and the all-argmax check with the plain-PyTorch model."""
    model = from_megatron_state_dict(full, ref_config()).eval()
    out = []
    with torch.no_grad():
        for ids, mask in rows:
            logits = model(torch.tensor([ids]))[0].double()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            pos = torch.tensor([t - 1 for t in range(1, len(ids)) if mask[t]])
            target = torch.tensor(ids)[pos + 1]
            lp = logp[pos].gather(-1, target.unsqueeze(-1)).sum()
            out.append((float(lp), bool((logits[pos].argmax(-1) == target).all())))
    return out


def test_probe_rows_fit_the_training_length() -> None:
    tok = ByteChatTokenizer()
    rows = probe_rows(tok, LENGTH)
    assert len(rows) == len(PROBE_DEPTHS)
    for ids, mask in rows:
        assert LENGTH - 80 <= len(ids) <= LENGTH and len(ids) == len(mask)
        answer = tok.decode([i for i, m in zip(ids, mask) if m], skip_special=True)
        assert answer.isdigit() and len(answer) == 7 and mask[-1]  # 7 digits, then end of turn
        assert answer in tok.decode(ids[: mask.index(True)])  # the needle is in the prompt


@pytest.mark.distributed
@pytest.mark.parametrize(
    "tp,pp,cp",
    [
        (2, 1, 1),
        pytest.param(1, 2, 1, marks=pytest.mark.slow),
        pytest.param(1, 1, 2, marks=pytest.mark.slow),
    ],
    ids=["tp2", "pp2", "cp2"],
)
def test_probe_matches_reference_and_is_logged(tp: int, pp: int, cp: int, tmp_path: Path) -> None:
    lines = (ROOT / "data/toy/preference.jsonl").read_text().splitlines()[:4]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    res = run_distributed(
        probe_worker, 2, timeout_s=300, tp=tp, pp=pp, cp=cp, data=str(data), out=str(tmp_path)
    )
    assert TINY["vocab_size"] == 264
    want = reference(res[0]["full"], res[0]["rows"])
    for r in res:  # every rank gets the same results
        got = r["results"]
        assert [ok for _, ok in got] == [ok for _, ok in want]
        assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], rel=1e-5)
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    probes = [x for x in logged if "probe/needle_greedy_acc" in x]
    assert [x["step"] for x in probes] == [1, 2]
    assert all(0.0 <= x["probe/needle_greedy_acc"] <= 1.0 for x in probes)
    assert all(x["probe/needle_answer_logp"] < 0 for x in probes)
