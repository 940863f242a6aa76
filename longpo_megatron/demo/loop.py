"""``longpo-demo run``: the whole self-evolution loop on one CPU machine, stage by stage.

shipped short-context model (verified) -> long documents of the demo's world -> ``longpo-datagen``
(the model writes questions about short chunks and answers them from the chunk = chosen and from
the whole document = rejected) -> ``longpo-preprocess`` -> HF -> Megatron conversion -> SFT, DPO
and LongPO through the real trainer on 2 ranks (same data, steps and seed) -> Megatron -> HF
exports -> ``longpo-eval`` of base, SFT, DPO and LongPO at a short and a long length -> table,
PNG and ``summary.json`` (:mod:`longpo_megatron.demo.report`). Every stage is a separate process
(:mod:`longpo_megatron.demo.stages`); everything lands under one output directory.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from longpo_megatron.demo.stages import REPO_ROOT, StageRunner, python_module, python_script
from longpo_megatron.errors import UserError

MARKER = ".longpo-demo"
"""File that marks a directory as a demo output (only such a directory is ever removed)."""
METHODS = ("sft", "dpo", "longpo")
"""Trained variants, in table order after the base model; each is a conf/longpo option."""
ARCH_SKIP = ("defaults", "name", "max_position_embeddings", "attention_backend", "recompute")
"""Keys of the converter's model.yaml that the demo's conf/model/demo.yaml or the loop decide."""


STAGE_DROPS = (
    ("instructions", "outcome"),
    ("records", "pairs_dropped"),
    ("records", "turns_dropped"),
    ("records", "records_skipped"),
)
"""(section, key) of datagen's report.json that count what was dropped and why."""


class DemoError(UserError, ValueError):
    """A demo setting or output directory that cannot work; the message names it."""


@dataclass(frozen=True)
class Budget:
    """The sizes that make a run long or short."""

    documents: int
    """Long documents the model generates its preference data from."""
    train_iters: int
    """Optimizer steps of each trained variant."""
    eval_samples: int
    """Samples per task x length x depth cell of each evaluation."""


BUDGETS = {"full": Budget(32, 48, 12), "quick": Budget(6, 3, 2)}
"""``--quick`` is the end-to-end test's size: every stage runs, nothing is measured well."""


@dataclass
class DemoConfig:
    """Settings of ``longpo-demo run`` (the command-line flags of the same names)."""

    out_dir: str = "outputs/demo"
    """Every artifact goes here (stage outputs, logs, table, plot, summary.json)."""
    model: str = str(REPO_ROOT / "data" / "demo-model")
    """The shipped short-context HF model (data/demo-model, built by ``longpo-demo pretrain``)."""
    quick: bool = False
    """Use the ``quick`` budget (a few documents, steps and samples) instead of ``full``."""
    overwrite: bool = False
    """Remove an earlier demo output in ``out_dir`` first (only one marked as a demo's)."""
    parallel: str = "tp2"
    """conf/parallel option of the three trainings (2 ranks: tp2, pp2 or dp2)."""
    seed: int = 1234
    """Seed of the documents, datagen sampling, training and evaluation."""
    long_factor: int = 8
    """Long length = long_factor x the model's SHORT_CONTEXT (documents and long evaluation)."""
    rotary_factor: float = 8.0
    """Policy RoPE θ = rotary_factor x the shipped θ (the reference keeps the shipped θ)."""
    beta: float = 0.1
    """β of DPO and LongPO (longpo.beta)."""
    lam: float = 1.0
    """λ, the weight of the preference term of DPO and LongPO (longpo.lam)."""
    documents: Optional[int] = None
    """Override of the budget's documents."""
    train_iters: Optional[int] = None
    """Override of the budget's train_iters."""
    eval_samples: Optional[int] = None
    """Override of the budget's eval_samples."""
    train_overrides: list[str] = field(default_factory=list)
    """Extra Hydra overrides for all three trainings (e.g. optim.lr=1e-3)."""

    def budget(self) -> Budget:
        """The budget with this run's overrides applied."""
        base = BUDGETS["quick" if self.quick else "full"]
        return Budget(
            self.documents or base.documents,
            self.train_iters or base.train_iters,
            self.eval_samples or base.eval_samples,
        )


class Paths:
    """Where each stage reads and writes under the output directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.documents = root / "documents.jsonl"
        self.datagen = root / "datagen"
        self.records = root / "datagen" / "records.jsonl"
        self.prepared = root / "prepared"
        self.init = root / "init"
        self.logs = root / "logs"
        self.eval = root / "eval"

    def run(self, method: str) -> Path:
        """Training output (metrics, checkpoint under ckpt/) of one method."""
        return self.root / "train" / method

    def hf(self, method: str) -> Path:
        """HF export of one trained method."""
        return self.root / "hf" / method


def check_config(cfg: DemoConfig) -> None:
    """Refuse settings that cannot work, before anything runs."""
    if cfg.long_factor < 8:
        raise DemoError(f"--long-factor={cfg.long_factor}: the demo shows >= 8x longer contexts")
    if cfg.rotary_factor < 1:
        raise DemoError(f"--rotary-factor={cfg.rotary_factor}: θ is raised, never lowered (>= 1)")
    for key in ("documents", "train_iters", "eval_samples"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise DemoError(f"--{key.replace('_', '-')}={value}: must be >= 1")
    if not (REPO_ROOT / "conf" / "parallel" / f"{cfg.parallel}.yaml").is_file():
        raise DemoError(f"--parallel={cfg.parallel!r}: no conf/parallel/{cfg.parallel}.yaml")
    if not (Path(cfg.model) / "config.json").is_file():
        raise DemoError(
            f"--model={cfg.model}: no HF model there (config.json); build it with "
            "`longpo-demo pretrain`"
        )


def prepare_out_dir(cfg: DemoConfig) -> Path:
    """The output directory, empty: a non-empty one is refused unless --overwrite and marked."""
    out = Path(cfg.out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        if not cfg.overwrite:
            raise DemoError(
                f"{out}: output directory is not empty (pass --overwrite to replace it)"
            )
        if not (out / MARKER).is_file():
            raise DemoError(f"{out}: not a demo output ({MARKER} missing); refusing to remove it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by longpo-demo run\n")
    return out


def write_documents(model: str, path: Path, n: int, tokens: int, seed: int) -> dict[str, Any]:
    """The world's long documents as JSONL (``id``, ``text``); returns their token counts."""
    from transformers import AutoTokenizer

    from longpo_megatron.demo import world

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    count = lambda text: len(tok.encode(text, add_special_tokens=False))  # noqa: E731
    docs = world.long_documents(n, tokens, seed, count)
    lengths = [count(d) for d in docs]
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": f"doc{i:04d}", "text": text}) + "\n")
    return {"documents": len(docs), "min_tokens": min(lengths), "max_tokens": max(lengths)}


def arch_overrides(model_yaml: Path) -> list[str]:
    """``model.<key>=<value>`` for the converted model's architecture (its model.yaml)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(OmegaConf.load(model_yaml))
    out = []
    for key, value in values.items():
        if key in ARCH_SKIP:
            continue
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        out.append(f"model.{key}={text}")
    return out


def shipped_rope_theta(model: str) -> float:
    """RoPE θ of the shipped HF model (config.json ``rope_theta``)."""
    config = json.loads((Path(model) / "config.json").read_text())
    theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta")
    if not theta:
        raise DemoError(f"{model}/config.json: no rope_theta (the demo raises θ for the policy)")
    return float(theta)


@dataclass(frozen=True)
class Lengths:
    """Token lengths of one run, derived from the world's SHORT_CONTEXT."""

    context: int
    """The world's SHORT_CONTEXT: the longest sequence the shipped model was trained on."""
    short: int
    """Short evaluation length (prompt tokens; the world leaves room for the answer)."""
    long: int
    """Long documents and the long evaluation length (long_factor x context)."""
    max_seq: int
    """Training limit of a long (policy) sequence: document + every turn's Q/A (2 x long)."""
    max_ref_seq: int
    """Training limit of a short (reference) sequence: chunk + one Q/A (4 x context)."""

    @classmethod
    def of(cls, context: int, short: int, factor: int) -> Lengths:
        """Lengths for a model trained on ``context`` tokens, evaluated short at ``short``."""
        if not 16 <= short <= context:
            raise DemoError(f"short evaluation length {short}: must lie in [16, {context}]")
        return cls(context, short, factor * context, 2 * factor * context, 4 * context)


def datagen_overrides(cfg: DemoConfig, paths: Paths, lengths: Lengths) -> list[str]:
    """``longpo-datagen`` overrides: hf backend on the shipped model, the world's prompts."""
    from longpo_megatron.demo import world

    return [
        "backend=hf",
        f"backend.model={cfg.model}",
        f"backend.max_model_len={lengths.max_seq}",
        f"input.paths=[{paths.documents}]",
        f"output_dir={paths.datagen}",
        f"seed={cfg.seed}",
        "records.training_stage=demo",
        f"records.max_seq_length={lengths.max_seq}",
        f"records.max_ref_seq_length={lengths.max_ref_seq}",
        *world.datagen_overrides(),
    ]


def data_overrides(cfg: DemoConfig, data_path: Path, lengths: Lengths) -> list[str]:
    """The ``data.*`` keys shared by ``longpo-preprocess`` and the trainings."""
    return [
        "data=demo",
        f"data.path={data_path}",
        f"data.tokenizer={cfg.model}",
        f"data.max_seq_length={lengths.max_seq}",
        f"data.max_ref_seq_length={lengths.max_ref_seq}",
    ]


def train_command(cfg: DemoConfig, paths: Paths, lengths: Lengths, method: str) -> list[str]:
    """One training run on 2 ranks under the project's launcher (torchrun, quiet endings)."""
    run = paths.run(method)
    return python_module(
        "longpo_megatron.launch",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "longpo_megatron.train",
        "model=demo",
        f"parallel={cfg.parallel}",
        f"longpo={method}",
        "train=demo_loop",
        "optim=demo_loop",
        *arch_overrides(paths.init / "model.yaml"),
        f"model.max_position_embeddings={lengths.max_seq}",
        *data_overrides(cfg, paths.prepared, lengths),
        f"checkpoint.load={paths.init}",
        f"checkpoint.save={run / 'ckpt'}",
        f"logging.output_dir={run}",
        f"train.train_iters={cfg.budget().train_iters}",
        f"train.seed={cfg.seed}",
        f"longpo.beta={cfg.beta}",
        f"longpo.lam={cfg.lam}",
        *cfg.train_overrides,
    )


def eval_command(cfg: DemoConfig, paths: Paths, lengths: Lengths, name: str, model: Path):
    """``longpo-eval`` of one HF model at the short and the long length."""
    from longpo_megatron.demo import world

    return python_module(
        "longpo_megatron.eval.cli",
        f"model={model}",
        f"name={name}",
        f"lengths=[{lengths.short},{lengths.long}]",
        f"seed={cfg.seed}",
        f"output_dir={paths.eval / name}",
        *world.eval_overrides(),
        f"samples={cfg.budget().eval_samples}",
    )


def vocab_multiple(model: str, tp: int) -> int:
    """--pad-vocab-multiple for the converter: 1 unless TP does not divide the vocabulary."""
    vocab = int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    return 1 if vocab % tp == 0 else tp


def check_records(report_path: Path) -> int:
    """Records the datagen made; none is an error that says why (the report's drop counts)."""
    report = json.loads(report_path.read_text())
    made = int(report.get("records", {}).get("records", 0))
    if made == 0:
        why = {k: report.get(k, {}).get(d) for k, d in STAGE_DROPS if report.get(k, {}).get(d)}
        raise DemoError(
            f"{report_path}: datagen made no records ({why or 'nothing dropped'}); the model "
            "cannot write the demo's data: check it, or rebuild it with `longpo-demo pretrain`"
        )
    return made


def make_data(runner: StageRunner, cfg: DemoConfig, paths: Paths, lengths: Lengths) -> dict:
    """documents -> datagen (2 shards side by side) -> merge -> preprocess."""
    n = cfg.budget().documents
    docs = runner.call(
        "documents",
        f"{n} documents of {lengths.long} tokens",
        write_documents,
        cfg.model,
        paths.documents,
        n,
        lengths.long,
        cfg.seed,
    )
    gen = datagen_overrides(cfg, paths, lengths)
    runner.run(
        "datagen",
        "the model writes questions, chosen (chunk) and rejected (document) answers; 2 shards",
        [python_module("longpo_megatron.datagen.cli", *gen, f"shard={i}/2") for i in range(2)],
    )
    merge = python_module("longpo_megatron.datagen.cli", *gen, "stage=merge", "shard=0/2")
    runner.run("merge", "join the shards' records", [merge])
    docs["records"] = check_records(paths.datagen / "report.json")
    preprocess = python_module(
        "longpo_megatron.data.preprocess",
        *data_overrides(cfg, paths.records, lengths),
        "--output",
        str(paths.prepared),
    )
    runner.run("preprocess", "tokenize the records (longpo-preprocess)", [preprocess])
    return docs


def train_all(runner: StageRunner, cfg: DemoConfig, paths: Paths, lengths: Lengths, theta: float):
    """HF -> Megatron (policy θ raised), the three trainings, Megatron -> HF exports."""
    policy_theta = theta * cfg.rotary_factor
    tp = 2 if cfg.parallel.startswith("tp") else 1
    convert = python_script(
        "tools/convert_hf_to_megatron.py",
        cfg.model,
        str(paths.init),
        f"--rotary-base={policy_theta}",
        f"--pad-vocab-multiple={vocab_multiple(cfg.model, tp)}",
        "--no-progress",
    )
    runner.run("convert", f"HF -> Megatron, policy θ {theta:g} -> {policy_theta:g}", [convert])
    steps = cfg.budget().train_iters
    for method in METHODS:
        runner.run(
            f"train-{method}",
            f"{steps} steps on 2 ranks ({cfg.parallel})",
            [train_command(cfg, paths, lengths, method)],
        )
    exports = [
        python_script(
            "tools/convert_megatron_to_hf.py",
            str(paths.run(m) / "ckpt"),
            str(paths.hf(m)),
            f"--template={paths.init / 'hf'}",
            "--no-progress",
        )
        for m in METHODS
    ]
    runner.run("export", "Megatron -> HF of " + ", ".join(METHODS), exports)


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Verify the shipped model, then run every stage; returns what summary.json holds."""
    check_config(cfg)  # before the world and the model's recipe are imported
    from longpo_megatron.demo import pretrain, report, world

    out = prepare_out_dir(cfg)
    paths = Paths(out)
    lengths = Lengths.of(world.SHORT_CONTEXT, world.eval_lengths()[0], cfg.long_factor)
    theta = shipped_rope_theta(cfg.model)
    runner = StageRunner(paths.logs, total=9 + len(METHODS))
    runner.call("verify", f"checksums of the shipped model {cfg.model}", pretrain.verify, cfg.model)
    clock = time.monotonic()  # the demo's clock starts after the shipped model is verified
    docs = make_data(runner, cfg, paths, lengths)
    train_all(runner, cfg, paths, lengths, theta)
    models = {"base": Path(cfg.model), **{m: paths.hf(m) for m in METHODS}}
    runner.run(
        "eval",
        f"longpo-eval of {', '.join(models)} at {lengths.short} and {lengths.long} tokens",
        [eval_command(cfg, paths, lengths, name, model) for name, model in models.items()],
    )
    facts = {
        "config": asdict(cfg),
        "budget": asdict(cfg.budget()),
        "lengths": asdict(lengths),
        "rope_theta": {"reference": theta, "policy": theta * cfg.rotary_factor},
        "documents": docs,
        "model": {"path": str(Path(cfg.model).resolve()), "checksums_verified": True},
    }
    return runner.call(
        "report", "table, plot and summary.json", report.write_report, out, facts, runner, clock
    )
