"""``longpo-eval``: RULER-style long- and short-context evaluation (docs/eval.md).

:mod:`.tasks` generates samples, :mod:`.render` renders them with the model's chat template,
:mod:`.backends` / :mod:`.megatron` ask an HF, vLLM or Megatron model, :mod:`.scoring` scores,
:mod:`.report` writes JSON, tables and heat-maps, :mod:`.probe` is the in-training needle probe.
"""
