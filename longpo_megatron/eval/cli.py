"""``longpo-eval``: RULER-style long- and short-context evaluation of an HF or Megatron model.

    longpo-eval model=/ckpt/hf_export lengths=[8192,32768,131072]          # HF dir, hf backend
    longpo-eval model=/ckpt/hf_export backend=vllm backend.tensor_parallel_size=4
    torchrun --nproc-per-node 2 -m longpo_megatron.eval.cli model=/ckpt/run \\
        megatron.tensor_model_parallel_size=2 mode=loglik                  # Megatron checkpoint
    longpo-eval preset=short model=...                                     # short-context retention
    longpo-eval compare=[before/results.json,after/results.json]          # before/after table

Writes ``<output_dir>/results.json`` and ``results.png`` and prints the table (docs/eval.md).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from longpo_megatron.errors import report_user_errors
from longpo_megatron.eval.backends import EvalConfigError
from longpo_megatron.eval.config import (
    EvalConfig,
    register_eval_configs,
    to_eval_config,
    validate_eval_config,
)
from longpo_megatron.eval.report import (
    compare_table,
    console_table,
    heatmap,
    load_results,
    write_results,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf" / "eval"
os.environ.setdefault("LONGPO_ROOT", str(REPO_ROOT))
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
"""Variables a Megatron evaluation sets when started without torchrun (restored after)."""


def is_hf_dir(path: str) -> bool:
    """An HF model directory (has config.json); anything else is taken as a Megatron checkpoint."""
    return (Path(path) / "config.json").is_file()


def _hf_evaluator(cfg: EvalConfig):
    from longpo_megatron.data.tokenizer import HFChatTokenizer
    from longpo_megatron.eval.backends import GenerationEvaluator

    backend = dataclasses.replace(cfg.backend, model=str(cfg.model))
    try:
        tokenizer = HFChatTokenizer(backend.tokenizer or backend.model)
        return GenerationEvaluator(backend, tokenizer)
    except (ValueError, OSError) as e:  # no chat template / eos, missing files, bad dtype
        if isinstance(e, EvalConfigError):
            raise
        raise EvalConfigError(f"model={cfg.model!r} (HF directory): {e}") from None


def run(cfg: EvalConfig, evaluator: Any = None) -> dict[str, Any]:
    """Validate, evaluate (or compare) and write the outputs; returns the result (or the
    comparison as ``{"compare": text}``)."""
    validate_eval_config(cfg)
    out = Path(cfg.output_dir)
    if cfg.compare:
        text = compare_table([load_results(p) for p in cfg.compare])
        print(text, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.txt").write_text(text + "\n")
        return {"compare": text}
    megatron = evaluator is None and not is_hf_dir(str(cfg.model))
    saved_env = {k: os.environ.get(k) for k in DIST_ENV}
    try:
        if evaluator is None:
            if megatron:
                from longpo_megatron.eval.megatron import load_checkpoint

                evaluator = load_checkpoint(str(cfg.model), cfg.megatron)
            else:
                evaluator = _hf_evaluator(cfg)
        rank0 = not megatron or _rank() == 0
        from longpo_megatron.eval.runner import evaluate

        result = evaluate(cfg, evaluator, progress=rank0)
        if rank0:
            write_results(result, out / "results.json")
            heatmap(result, out / "results.png")
            print(console_table(result), flush=True)
            print(f"wrote {out / 'results.json'} and {out / 'results.png'}", flush=True)
        return result
    finally:
        if evaluator is not None:
            evaluator.close()
        if megatron:
            from longpo_megatron import distributed

            distributed.destroy()
            for key, value in saved_env.items():  # a plain process got a 1-rank world's env
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
@report_user_errors
def _hydra_main(dcfg: DictConfig) -> None:
    run(to_eval_config(dcfg))


def main() -> None:
    """Console entry point."""
    register_eval_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
