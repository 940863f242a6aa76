"""Typed configuration of ``longpo-datagen`` (Hydra root ``conf/datagen/datagen.yaml``).

One dataclass per section; every key has a docstring. Registered in Hydra's ConfigStore as
``datagen_schema`` (root) and ``<group>_schema`` for the groups under ``conf/datagen/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from longpo_megatron.errors import UserError

STAGES = ("chunk", "instructions", "chosen", "rejected", "records")
"""Pipeline stages in order; ``all`` runs them in turn, ``merge`` joins finished shards."""


@dataclass
class InputConfig:
    """Long documents to generate from."""

    paths: list[str] = field(default_factory=lambda: ["${oc.env:LONGPO_ROOT,.}/data/corpus"])
    """Files or directories: *.jsonl / *.json (one document per line), *.txt / *.md (one
    document per file), *.parquet (one document per row). Directories are walked, sorted."""
    text_field: str = "text"
    """JSONL / Parquet field holding the document text."""
    id_field: str = "id"
    """JSONL / Parquet field holding a unique document id; absent -> ``<file stem>-<line>``."""
    source_field: str = "source"
    """Optional JSONL / Parquet field naming the document's origin (kept in record metadata)."""
    policy: str = "error"
    """A bad document: error (stop, naming file, line and field) | skip (count in the report)."""
    max_documents: Optional[int] = None
    """Use only the first N documents (over all shards); null = all."""


@dataclass
class ChunkingConfig:
    """How documents are cut into the short contexts that instructions are written from."""

    min_tokens: int = 16384
    """Smallest chunk; a document shorter than one chunk is bad input (document_too_short)."""
    max_tokens: int = 30000
    """Largest chunk (chunks are cut on boundaries, never mid-token)."""
    boundary: str = "paragraph"
    """paragraph (blank lines) | section (section headings first, then paragraphs)."""
    section_pattern: str = r"^(?:\\(?:chapter|section|subsection)\b|#{1,3} )"
    """Regex (multiline) of a line that starts a section, for boundary=section."""
    max_document_tokens: Optional[int] = None
    """Longer documents are bad input (document_too_long); null = no limit."""


@dataclass
class SamplingConfig:
    """Decoding settings of one generation stage."""

    do_sample: bool = False
    """false = greedy decoding."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = no top-k cut."""
    max_new_tokens: int = 1024
    """An answer that hits this limit is truncated and filtered out (reason ``truncated``)."""


@dataclass
class InstructionConfig:
    """Stage ``instructions``: the model writes numbered questions about each chunk."""

    template: str = (
        "{context}\n\n---\n\nWrite {num_questions} questions about the text above. Each should "
        "need careful reading of the text to answer: ask for explanations, comparisons, "
        "summaries or reasoning, not isolated facts. Number them '1:', '2:' and so on, one per "
        "line, and write nothing else."
    )
    """User message; must contain {context} and {num_questions}."""
    num_questions: int = 4
    """Questions asked for per chunk."""
    require_exact_count: bool = True
    """Drop a chunk unless exactly num_questions well-formed questions parse (as the authors)."""
    keep_per_chunk: int = 1
    """Questions kept per chunk (picked with the seeded RNG)."""
    min_chars: int = 12
    """Shortest well-formed question."""
    max_chars: int = 400
    """Longest well-formed question."""
    prefixes: list[str] = field(default_factory=list)
    """Phrases put before a kept question (variety; see prompts.DEFAULT_PREFIXES when empty)."""
    prefix_probability: float = 1.0
    """Chance that a kept question gets a prefix."""
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(
            do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=1024
        )
    )


@dataclass
class AnswerConfig:
    """Stages ``chosen`` (chunk + question) and ``rejected`` (whole document + question)."""

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Greedy by default."""


@dataclass
class FilterConfig:
    """Stage ``records``: which answer pairs are unusable (each drop is counted by reason)."""

    refusal_patterns: list[str] = field(default_factory=list)
    """Case-insensitive regexes of refusals; see filters.DEFAULT_REFUSALS when empty."""
    min_chars: int = 2
    """Shorter (stripped) answers are ``empty``."""
    max_answer_tokens: Optional[int] = None
    """Longer answers are ``over_long``; null = the stage's max_new_tokens only."""
    ngram: int = 4
    """Word n-gram size of the repetition check."""
    max_repeated_ngram_fraction: float = 0.5
    """More repeated n-grams than this fraction (answers of >= 4n words) = ``repetition``."""
    max_same_token_run: int = 12
    """A word repeated more often than this in a row = ``repetition``."""
    min_alpha_fraction: float = 0.25
    """Fewer letters among non-space characters = ``meaningless``."""
    check_rejected: bool = True
    """Apply the filters to rejected answers too (the authors filter both)."""
    keep_truncated_rejected: bool = False
    """Keep pairs whose REJECTED answer was cut off at max_new_tokens (dropped even with
    check_rejected=false otherwise): when the model never learnt long inputs, running on is the
    long-context answer to push down (trained as generated, end of turn appended). An empty
    answer has nothing to store and is still dropped."""
    drop_identical: bool = True
    """chosen == rejected carries no preference: ``identical``."""


@dataclass
class RecordsConfig:
    """Stage ``records``: grouping into multi-turn records and the training stage's limits."""

    turns_per_record: int = 4
    """Turns (instruction, chunk, chosen, rejected) per record (the released data used 4)."""
    min_turns: int = 1
    """A document's last group with fewer turns is dropped (counted as too_few_turns)."""
    training_stage: str = "128k"
    """Name stored in metadata.stage."""
    tokenizer: Optional[str] = None
    """Training tokenizer for token lengths and limits: byte | local HF dir; null = generator's."""
    max_seq_length: int = 131072
    """Longest long (policy) sequence."""
    max_ref_seq_length: int = 32768
    """Longest short (reference) sequence."""
    over_length_policy: str = "skip"
    """A record over a limit: skip (count it) | error (stop). Never truncated."""
    id_prefix: str = ""
    """Prefix of record ids (``<prefix><doc id>-<k>``)."""


@dataclass
class BackendConfig:
    """The generating model behind one interface (datagen.backends)."""

    name: str = "hf"
    """hf (transformers generate) | vllm | ``package.module:factory`` (a plug-in)."""
    model: str = "${oc.env:LONGPO_DATAGEN_MODEL}"
    """Local model directory (nothing is downloaded)."""
    tokenizer: Optional[str] = None
    """Local tokenizer directory; null = the model directory."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16."""
    device: str = "auto"
    """hf: auto | cpu | cuda | cuda:N."""
    batch_size: int = 8
    """Requests per batch (the unit of resume); part of the resume fingerprint."""
    max_batch_tokens: int = 8192
    """hf: a batch is split into consecutive generate calls of at most this many padded prompt
    tokens (at least one request each); padding masks grow with batch x length^2."""
    max_model_len: Optional[int] = None
    """Longest prompt + answer; null = the model config's max_position_embeddings."""
    tensor_parallel_size: int = 1
    """vllm: GPUs per model replica."""
    gpu_memory_utilization: float = 0.9
    """vllm: fraction of GPU memory for weights + KV cache."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Model config keys to override at load, e.g. {rope_theta: 1e7} for the rejected stage."""
    trust_remote_code: bool = False


@dataclass
class DatagenConfig:
    """Root of ``longpo-datagen``."""

    stage: str = "all"
    """chunk | instructions | chosen | rejected | records | all | merge."""
    output_dir: str = "outputs/datagen"
    """Per-shard work under shard-IIIII-of-NNNNN/; ``merge`` writes records.jsonl here."""
    shard: str = "0/1"
    """``i/n``: this process handles documents whose index % n == i (Slurm arrays)."""
    seed: int = 1234
    """Every sampled choice derives from it (per stage and batch / request)."""
    progress: bool = True
    """tqdm progress bars with ETA on stderr."""
    overwrite: bool = False
    """Discard outputs made with different settings instead of refusing to mix them."""
    input: InputConfig = field(default_factory=InputConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    instructions: InstructionConfig = field(default_factory=InstructionConfig)
    chosen: AnswerConfig = field(default_factory=AnswerConfig)
    rejected: AnswerConfig = field(default_factory=AnswerConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    defaults: list[Any] = field(default_factory=list)
    """Hydra defaults list (kept so structured-config validation accepts it)."""


GROUPS = {"backend": BackendConfig}
"""Hydra groups under conf/datagen/ with a schema node (``<group>_schema``)."""


def register_datagen_configs() -> None:
    """Register the schema so Hydra type-checks every datagen YAML and override."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="datagen_schema", node=DatagenConfig)
    for group, node in GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)


def to_datagen_config(cfg: Any) -> DatagenConfig:
    """A composed DictConfig as a typed :class:`DatagenConfig` (unknown keys are an error)."""
    from longpo_megatron.config import to_typed

    return to_typed(cfg, DatagenConfig, "longpo_megatron/datagen/config.py")


class DatagenConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key and the rule."""


def parse_shard(spec: str) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        left, right = str(spec).split("/")
        index, count = int(left), int(right)
    except ValueError:
        raise DatagenConfigError(f"shard={spec!r}: must look like i/n, e.g. 3/8") from None
    if count < 1 or not 0 <= index < count:
        raise DatagenConfigError(f"shard={spec!r}: need n >= 1 and 0 <= i < n")
    return index, count


def _check(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise DatagenConfigError(f"{key}={value!r}: {rule}")


def _check_sampling(prefix: str, s: SamplingConfig) -> None:
    _check(s.max_new_tokens > 0, f"{prefix}.max_new_tokens", s.max_new_tokens, "must be > 0")
    _check(s.temperature > 0, f"{prefix}.temperature", s.temperature, "must be > 0")
    _check(0 < s.top_p <= 1, f"{prefix}.top_p", s.top_p, "must be in (0, 1]")
    _check(s.top_k >= 0, f"{prefix}.top_k", s.top_k, "must be >= 0")


def validate_datagen_config(cfg: DatagenConfig) -> None:
    """Refuse settings that cannot work before any model is loaded."""
    allowed = (*STAGES, "all", "merge")
    _check(cfg.stage in allowed, "stage", cfg.stage, f"must be one of {allowed}")
    parse_shard(cfg.shard)
    _check(cfg.input.policy in ("error", "skip"), "input.policy", cfg.input.policy, "error|skip")
    c = cfg.chunking
    _check(c.min_tokens > 0, "chunking.min_tokens", c.min_tokens, "must be > 0")
    _check(c.max_tokens >= c.min_tokens, "chunking.max_tokens", c.max_tokens, ">= min_tokens")
    _check(c.boundary in ("paragraph", "section"), "chunking.boundary", c.boundary, "bad value")
    ins = cfg.instructions
    for key in ("{context}", "{num_questions}"):
        _check(key in ins.template, "instructions.template", "...", f"must contain {key}")
    _check(ins.num_questions >= 1, "instructions.num_questions", ins.num_questions, ">= 1")
    _check(
        1 <= ins.keep_per_chunk <= ins.num_questions,
        "instructions.keep_per_chunk",
        ins.keep_per_chunk,
        "must be in [1, num_questions]",
    )
    _check(
        0 <= ins.prefix_probability <= 1,
        "instructions.prefix_probability",
        ins.prefix_probability,
        "in [0, 1]",
    )
    for name, s in (
        ("instructions.sampling", ins.sampling),
        ("chosen.sampling", cfg.chosen.sampling),
        ("rejected.sampling", cfg.rejected.sampling),
    ):
        _check_sampling(name, s)
    r = cfg.records
    _check(r.turns_per_record >= 1, "records.turns_per_record", r.turns_per_record, ">= 1")
    _check(
        1 <= r.min_turns <= r.turns_per_record,
        "records.min_turns",
        r.min_turns,
        "in [1, turns_per_record]",
    )
    policy = r.over_length_policy
    _check(policy in ("error", "skip"), "records.over_length_policy", policy, "error|skip")
    _check(cfg.backend.batch_size >= 1, "backend.batch_size", cfg.backend.batch_size, ">= 1")
    tokens = cfg.backend.max_batch_tokens
    _check(tokens >= 1, "backend.max_batch_tokens", tokens, ">= 1")
    _check(cfg.filters.ngram >= 1, "filters.ngram", cfg.filters.ngram, ">= 1")
