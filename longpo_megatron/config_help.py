"""Hydra ergonomics of the training app: a ``--help`` that lists real options, and one output
directory per multirun job.

Both are OmegaConf resolvers, registered by :func:`longpo_megatron.config.register_configs`:

* ``${longpo_help:}`` renders the training app's groups and their YAML options (from ``conf/``;
  never the ``*_schema`` nodes of the ConfigStore nor the separate datagen tree) and every key
  with its type, default and docstring (from :mod:`longpo_megatron.config`). The app's
  ``hydra/help`` template (``conf/hydra/help/longpo.yaml``) is this one resolver.
* ``${longpo_job_dir:<base>}`` is ``<base>`` in a single run and ``<base>/<job>-<hash of the
  job's overrides>`` inside a Hydra multirun, so sweep jobs never append to one metrics file.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import inspect
import os
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"
NOT_TRAINING = ("datagen", "eval", "hydra")
"""conf/ subtrees that are not groups of the training app."""


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass whose fields carry a string literal below them."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def group_options(conf: Path = CONF) -> dict[str, list[str]]:
    """Training groups (conf/ subdirectories) and their YAML options."""
    return {
        d.name: sorted(p.stem for p in d.glob("*.yaml"))
        for d in sorted(conf.iterdir())
        if d.is_dir() and d.name not in NOT_TRAINING
    }


def training_help() -> str:
    """The ``--help`` text of the training app."""
    from longpo_megatron.config import GROUPS

    lines = [
        "longpo-train: LongPO on megatron-core. Compose with group=option and override any",
        "key with group.key=value, e.g.",
        "  torchrun --nproc-per-node 2 -m longpo_megatron.train parallel=dp2 longpo.beta=0.1",
        "  python -m longpo_megatron.train experiment=mistral_128k data.path=... --cfg job",
        "Multirun (-m a=1,2): each job writes to its own logging.output_dir/<job>-<hash>.",
        "",
        "Groups (option: conf/<group>/<option>.yaml):",
    ]
    lines += [f"  {g}: {', '.join(opts)}" for g, opts in group_options().items()]
    lines += ["", "Keys (type = default: meaning):"]
    for group, cls in GROUPS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "..."
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", f.type)
            lines.append(f"  {group}.{f.name} ({kind} = {default}): {docs.get(f.name, '')}")
    lines += ["", "Hydra's own flags: --hydra-help."]
    return "\n".join(lines)


def job_output_dir(base: str) -> str:
    """``base`` in a single run; ``base/<job number>-<hash of its overrides>`` in a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):  # not inside a Hydra app (compose API, tests)
        return base
    if hc.mode != RunMode.MULTIRUN:
        return base
    digest = hashlib.sha1("\n".join(hc.overrides.task).encode()).hexdigest()[:8]
    return os.path.join(base, f"{hc.job.num}-{digest}")


def register_resolvers() -> None:
    """Register ``longpo_help`` and ``longpo_job_dir`` with OmegaConf (idempotent)."""
    from omegaconf import OmegaConf

    # Hydra passes the help template through string.Template: "$" must be doubled.
    OmegaConf.register_new_resolver(
        "longpo_help", lambda: training_help().replace("$", "$$"), replace=True
    )
    OmegaConf.register_new_resolver("longpo_job_dir", job_output_dir, replace=True)
