"""One shard of ``longpo-datagen``: the stages, their resume logic and the shard report.

Stages run in order (chunk -> instructions -> chosen / rejected -> records); each writes under
``<output_dir>/shard-IIIII-of-NNNNN/`` and records its settings fingerprint in manifest.json.
A generation stage works through fixed batches of a sorted work list and appends each finished
batch, so a rerun after a crash skips finished batches and redoes the rest identically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from longpo_megatron.data.records import RecordError, check_encodable, records_to_jsonl
from longpo_megatron.data.tokenizer import build_tokenizer
from longpo_megatron.datagen.backends.base import GenerationBackend, GenerationRequest
from longpo_megatron.datagen.chunking import chunk_document
from longpo_megatron.datagen.config import STAGES, DatagenConfig, SamplingConfig, parse_shard
from longpo_megatron.datagen.documents import shard_documents
from longpo_megatron.datagen.grouping import build_records
from longpo_megatron.datagen.prompts import (
    DEFAULT_PREFIXES,
    answer_prompt,
    instruction_prompt,
    parse_questions,
    pick_instructions,
    stable_seed,
)
from longpo_megatron.datagen.store import (
    Manifest,
    StageFile,
    fingerprint,
    read_jsonl,
    write_atomic,
    write_jsonl_atomic,
)
from longpo_megatron.errors import UserError

UPSTREAM = {"instructions": "chunk", "chosen": "instructions", "rejected": "instructions"}
TOOL = "longpo-datagen/1"


class StageStateError(UserError, RuntimeError):
    """Outputs on disk do not fit this run (other settings, or a stage not finished)."""


@dataclass
class WorkItem:
    """One generation request of a stage."""

    key: str
    prompt: str
    extra: dict[str, Any] = field(default_factory=dict)
    """Stored with the result row (e.g. the chunk of an instruction row)."""


def shard_dirname(index: int, count: int) -> str:
    """``shard-00003-of-00008``."""
    return f"shard-{index:05d}-of-{count:05d}"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class ShardPipeline:
    """Runs stages for one shard; ``backend`` is built on first use when given as a factory."""

    def __init__(
        self,
        cfg: DatagenConfig,
        backend: GenerationBackend | Callable[[], GenerationBackend],
    ) -> None:
        self.cfg = cfg
        self.shard = parse_shard(cfg.shard)
        self.dir = Path(cfg.output_dir) / shard_dirname(*self.shard)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(self.dir / "manifest.json")
        self._backend_or_factory = backend
        self._backend: Optional[GenerationBackend] = None
        self._docs: Optional[list[dict[str, Any]]] = None
        self._instructions: Optional[dict[str, dict[str, Any]]] = None

    @property
    def backend(self) -> GenerationBackend:
        """The backend (built now if a factory was given)."""
        if self._backend is None:
            obj = self._backend_or_factory
            self._backend = obj if isinstance(obj, GenerationBackend) else obj()
        return self._backend

    def close(self) -> None:
        """Free the backend if this pipeline built it."""
        if self._backend is not None and self._backend is not self._backend_or_factory:
            self._backend.close()
            self._backend = None

    def log(self, message: str) -> None:
        """One line on stderr, tagged with the shard."""
        print(f"[datagen {self.cfg.shard}] {message}", file=sys.stderr, flush=True)

    def run(self, stage: str = "all") -> dict[str, Any]:
        """Run one stage or all of them; returns the shard report (after ``records``)."""
        for name in STAGES if stage == "all" else (stage,):
            getattr(self, f"run_{name}")()
        return self.report()

    # --- bookkeeping -------------------------------------------------------------------------

    def _begin(self, name: str, settings: dict[str, Any]) -> bool:
        """Check outputs against ``settings``; True when the stage is already complete."""
        fp = fingerprint(settings)
        entry = self.manifest.stage(name)
        if entry and entry.get("fingerprint") != fp:
            old = entry.get("settings", {})
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if not self.cfg.overwrite:
                raise StageStateError(
                    f"{self.dir}: stage {name!r} was started with other settings (changed: "
                    f"{changed}); resume with the same settings, use another output_dir, or "
                    "set overwrite=true to discard it"
                )
            self.log(f"overwrite: discarding stage {name} (changed: {changed})")
            (self.dir / f"{name}.jsonl").unlink(missing_ok=True)
            entry = {}
        if entry.get("complete"):
            return True
        self.manifest.set_stage(name, fingerprint=fp, settings=settings, complete=False)
        return False

    def _require(self, name: str) -> dict[str, Any]:
        """The manifest entry of a finished stage whose upstream is still the one it used."""
        entry = self.manifest.stage(name)
        if not entry.get("complete"):
            raise StageStateError(f"{self.dir}: stage {name!r} has not finished; run it first")
        up = UPSTREAM.get(name)
        if up and entry["settings"].get("upstream") != self._require(up)["fingerprint"]:
            raise StageStateError(
                f"{self.dir}: stage {name!r} was made from an older {up!r} output; rerun "
                f"{name!r} (overwrite=true)"
            )
        return entry

    def _stage_settings(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        up = UPSTREAM.get(name)
        upstream = self._require(up)["fingerprint"] if up else None
        return {"upstream": upstream, "backend": self.backend.describe(), **body}

    # --- stage: chunk -------------------------------------------------------------------------

    def run_chunk(self) -> None:
        """Read this shard's documents, validate them and cut them into chunks."""
        settings = {
            "upstream": None,
            "shard": self.cfg.shard,
            "input": dataclasses.asdict(self.cfg.input),
            "chunking": dataclasses.asdict(self.cfg.chunking),
            "tokenizer": self.backend.describe().get("tokenizer", self.backend.describe()),
        }
        if self._begin("chunk", settings):
            return
        skipped: Counter = Counter()
        messages: list[str] = []

        def on_error(err: RecordError) -> None:
            skipped[err.reason] += 1
            messages.append(str(err))

        docs = shard_documents(self.cfg.input, self.shard, on_error)
        rows, stats = [], Counter()
        for g, doc in self._progress(docs, "chunk", unit="doc"):
            row = self._chunk_one(g, doc)
            if isinstance(row, RecordError):
                on_error(row)
                continue
            stats["chunks"] += len(row["chunks"])
            stats["unused_tail_tokens"] += row.pop("unused_tail_tokens")
            stats["hard_cuts"] += row.pop("hard_cuts")
            rows.append(row)
        write_jsonl_atomic(self.dir / "documents.jsonl", rows)
        summary = {
            "documents_kept": len(rows),
            "documents_skipped": dict(sorted(skipped.items())),
            "messages": messages,
            **stats,
        }
        self.manifest.update_stage("chunk", complete=True, stats=summary)
        self.log(f"chunk: {len(rows)} documents, {stats['chunks']} chunks, skipped {dict(skipped)}")

    def _chunk_one(self, g: int, doc: Any) -> dict[str, Any] | RecordError:
        """Chunk one document, or the RecordError that makes it bad input (policy applies)."""
        c = self.cfg.chunking
        count = self.backend.count_tokens
        n = count(doc.text)
        where = {"field": self.cfg.input.text_field, "path": doc.path, "line": doc.line}
        if n < c.min_tokens:
            rule = f"document has {n} tokens, shorter than one chunk (chunking.min_tokens="
            rule += f"{c.min_tokens})"
            err = RecordError("document_too_short", rule, record_id=doc.id, **where)
        elif c.max_document_tokens is not None and n > c.max_document_tokens:
            rule = f"document has {n} tokens, over chunking.max_document_tokens="
            rule += f"{c.max_document_tokens}"
            err = RecordError("document_too_long", rule, record_id=doc.id, **where)
        else:
            chunks, st = chunk_document(
                doc.text, count, c.min_tokens, c.max_tokens, c.boundary, c.section_pattern
            )
            return {
                "doc_id": doc.id,
                "index": g,
                "source": doc.source,
                "path": doc.path,
                "line": doc.line,
                "n_tokens": n,
                "chunks": [[ch.start, ch.end, ch.n_tokens] for ch in chunks],
                "unused_tail_tokens": st.unused_tail_tokens,
                "hard_cuts": st.hard_cuts,
                "text": doc.text,
            }
        if self.cfg.input.policy == "error":
            raise err
        return err

    def documents(self) -> list[dict[str, Any]]:
        """Rows of documents.jsonl (the chunk stage must have finished)."""
        if self._docs is None:
            self._require("chunk")
            self._docs = read_jsonl(self.dir / "documents.jsonl")
        return self._docs

    # --- generation stages --------------------------------------------------------------------

    def _progress(self, items: Any, desc: str, unit: str = "req", **kw: Any) -> Any:
        from tqdm import tqdm

        return tqdm(
            items,
            desc=f"[{self.cfg.shard}] {desc}",
            unit=unit,
            disable=not self.cfg.progress,
            mininterval=1.0,
            dynamic_ncols=True,
            **kw,
        )

    def _generate(
        self,
        name: str,
        items: list[WorkItem],
        sampling: SamplingConfig,
        finish: Optional[Callable[[WorkItem, dict[str, Any]], None]] = None,
    ) -> None:
        """Work through fixed batches of ``items``, appending each finished batch."""
        size = self.cfg.backend.batch_size
        batches = [items[i : i + size] for i in range(0, len(items), size)]
        out = StageFile(self.dir / f"{name}.jsonl")
        out.path.touch()
        done = out.load({k: {it.key for it in b} for k, b in enumerate(batches)})
        pending = [k for k, b in enumerate(batches) if b[0].key not in done]
        if done:
            self.log(f"{name}: resuming, {len(done)} of {len(items)} requests already done")
        bar = self._progress(None, name, total=len(items), initial=len(done))
        start, generated, requests = time.perf_counter(), 0, 0
        for k in pending:
            rows = self._run_batch(name, k, batches[k], sampling, finish)
            out.append_batch(rows)
            generated += sum(r.get("n_tokens", 0) for r in rows)
            requests += len(rows)
            bar.update(len(rows))
        bar.close()
        seconds = time.perf_counter() - start
        stats = {
            "requests": len(items),
            "requests_this_run": requests,
            "seconds_this_run": round(seconds, 3),
            "generated_tokens_this_run": generated,
            "requests_per_s": round(requests / seconds, 3) if requests and seconds else None,
        }
        rows = read_jsonl(out.path)
        stats["status"] = dict(Counter(r["status"] for r in rows))
        self.manifest.update_stage(name, complete=True, stats=stats)
        self.log(f"{name}: {len(items)} requests done ({requests} in {seconds:.1f} s this run)")

    def _run_batch(
        self,
        name: str,
        k: int,
        batch: list[WorkItem],
        sampling: SamplingConfig,
        finish: Optional[Callable[[WorkItem, dict[str, Any]], None]],
    ) -> list[dict[str, Any]]:
        """Generate one batch; prompts that cannot fit the model are answered with a status."""
        limit = self.backend.max_model_len()
        rows: dict[str, dict[str, Any]] = {}
        fits: list[tuple[WorkItem, int]] = []
        for item in batch:
            n = self.backend.prompt_tokens(item.prompt)
            row = {"key": item.key, "batch": k, "prompt_tokens": n, **item.extra}
            rows[item.key] = row
            if limit is not None and n + sampling.max_new_tokens > limit:
                row["status"] = "prompt_too_long"
            else:
                fits.append((item, n))
        requests = [
            GenerationRequest(it.key, it.prompt, stable_seed(self.cfg.seed, name, it.key))
            for it, _ in fits
        ]
        gens = self.backend.generate(requests, sampling, stable_seed(self.cfg.seed, name, k))
        if len(gens) != len(requests):
            raise RuntimeError(f"backend returned {len(gens)} answers for {len(requests)} prompts")
        for (item, _), gen in zip(fits, gens):
            row = rows[item.key]
            row.update(status="ok", text=gen.text, n_tokens=gen.n_tokens)
            row["finish_reason"] = gen.finish_reason
            if finish is not None:
                finish(item, row)
        return [rows[item.key] for item in batch]

    def _instruction_settings(self) -> dict[str, Any]:
        ins = dataclasses.asdict(self.cfg.instructions)
        prefixes = list(self.cfg.instructions.prefixes) or list(DEFAULT_PREFIXES)
        ins.pop("prefixes")
        ins["prefixes_sha"] = _sha("\n".join(prefixes))
        ins["template_sha"] = _sha(ins.pop("template"))
        return self._stage_settings("instructions", {"instructions": ins, "seed": self.cfg.seed})

    def run_instructions(self) -> None:
        """The model writes numbered questions about each chunk; parse and pick them."""
        settings = self._instruction_settings()
        if self._begin("instructions", settings):
            return
        ins = self.cfg.instructions
        items = []
        for doc in self.documents():
            for c, (start, end, _n) in enumerate(doc["chunks"]):
                prompt = instruction_prompt(ins.template, doc["text"][start:end], ins.num_questions)
                items.append(WorkItem(f"{doc['doc_id']}#{c}", prompt))
        prefixes = list(ins.prefixes) or list(DEFAULT_PREFIXES)

        def finish(item: WorkItem, row: dict[str, Any]) -> None:
            parsed = parse_questions(
                row["text"],
                ins.num_questions,
                truncated=row["finish_reason"] == "length",
                require_exact_count=ins.require_exact_count,
                min_chars=ins.min_chars,
                max_chars=ins.max_chars,
            )
            row.update(questions=parsed.questions, malformed=parsed.malformed)
            row["parse"] = parsed.reason or "ok"
            if parsed.reason is None:
                rng = random.Random(stable_seed(self.cfg.seed, "pick", item.key))
                picked = pick_instructions(
                    parsed.questions, ins.keep_per_chunk, prefixes, ins.prefix_probability, rng
                )
                row["instructions"] = [{"prefix": p, "text": t} for p, t in picked]

        self._generate("instructions", items, ins.sampling, finish)

    def instruction_rows(self) -> dict[str, dict[str, Any]]:
        """Rows of instructions.jsonl by chunk key."""
        if self._instructions is None:
            self._require("instructions")
            rows = read_jsonl(self.dir / "instructions.jsonl")
            self._instructions = {r["key"]: r for r in rows}
        return self._instructions

    def _answer_items(self, side: str) -> list[WorkItem]:
        rows = self.instruction_rows()
        items = []
        for doc in self.documents():
            for c, (start, end, _n) in enumerate(doc["chunks"]):
                for q, ins in enumerate(rows[f"{doc['doc_id']}#{c}"].get("instructions", [])):
                    context = doc["text"][start:end] if side == "chosen" else doc["text"]
                    prompt = answer_prompt(context, ins["text"])
                    items.append(WorkItem(f"{doc['doc_id']}#{c}#{q}", prompt))
        return items

    def _run_answers(self, side: str) -> None:
        sampling = getattr(self.cfg, side).sampling
        body = {"sampling": dataclasses.asdict(sampling), "seed": self.cfg.seed}
        if self._begin(side, self._stage_settings(side, body)):
            return
        self._generate(side, self._answer_items(side), sampling)

    def run_chosen(self) -> None:
        """Answer each instruction from its chunk only (the preferred, short-context answer)."""
        self._run_answers("chosen")

    def run_rejected(self) -> None:
        """Answer each instruction from the whole document (the dispreferred answer)."""
        self._run_answers("rejected")

    # --- stage: records -----------------------------------------------------------------------

    def generator_metadata(self) -> dict[str, Any]:
        """What made the records: per generation stage its backend and settings."""
        meta: dict[str, Any] = {"tool": TOOL, "seed": self.cfg.seed}
        for name in ("instructions", "chosen", "rejected"):
            settings = dict(self._require(name)["settings"])
            settings.pop("upstream", None)
            settings.pop("seed", None)
            meta[name] = settings
        return meta

    def training_tokenizer(self) -> str:
        """records.tokenizer, else the tokenizer that generated the answers."""
        name = self.cfg.records.tokenizer
        if not name:
            name = self._require("chosen")["settings"]["backend"].get("tokenizer")
        if not name:
            raise StageStateError(
                "records.tokenizer is not set and the backend names no tokenizer: set it to "
                "byte or a local HF tokenizer directory"
            )
        return str(name)

    def run_records(self) -> None:
        """Filter pairs, group turns into records, apply the training limits, write the shard."""
        docs = self.documents()
        stage_rows = {}
        for name in ("instructions", "chosen", "rejected"):
            self._require(name)
            stage_rows[name] = _encodable_rows(self.dir / f"{name}.jsonl")
        tokenizer = build_tokenizer(self.training_tokenizer())
        records, grouping = build_records(
            docs, stage_rows, self.generator_metadata(), self.cfg, tokenizer
        )
        write_atomic(self.dir / "records.jsonl", records_to_jsonl(records).encode("ascii"))
        self.manifest.set_stage("records", complete=True, stats=grouping.to_dict())
        report = self.report()
        text = json.dumps(report, indent=1, sort_keys=True) + "\n"
        write_atomic(self.dir / "report.json", text.encode("ascii"))
        self.log(summary_line(report))
        if not records:
            self.log("WARNING: no records were made; see report.json for the reasons")

    def report(self) -> dict[str, Any]:
        """Counts of every stage run so far (JSON-ready)."""
        stages = self.manifest.data["stages"]
        out: dict[str, Any] = {"shard": self.cfg.shard, "dir": str(self.dir)}
        if "chunk" in stages:
            out["documents"] = stages["chunk"].get("stats", {})
        if self.manifest.complete("instructions"):
            rows = self.instruction_rows().values()
            outcome = Counter(r["parse"] if r["status"] == "ok" else r["status"] for r in rows)
            out["instructions"] = {
                "chunks": len(rows),
                "outcome": dict(sorted(outcome.items())),
                "questions_parsed": sum(len(r.get("questions", [])) for r in rows),
                "questions_malformed": sum(r.get("malformed", 0) for r in rows),
                "instructions": sum(len(r.get("instructions", [])) for r in rows),
                **stages["instructions"].get("stats", {}),
            }
        for side in ("chosen", "rejected"):
            if side in stages:
                out[side] = stages[side].get("stats", {})
        if "records" in stages:
            out["records"] = stages["records"].get("stats", {})
        return out


def _encodable_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of a generation stage by key; backend text no tokenizer can encode (a lone
    surrogate) is a :class:`RecordError` naming the stage file, line, key and field."""
    rows = read_jsonl(path)
    for line, row in enumerate(rows, start=1):
        texts = [("text", row.get("text"))] if row.get("status") == "ok" else []
        for i, ins in enumerate(row.get("instructions") or []):
            texts.append((f"instructions[{i}].text", ins.get("text")))
        try:
            for name, text in texts:
                if isinstance(text, str):
                    check_encodable(text, name)
        except RecordError as err:
            raise err.located(path=str(path), line=line, record_id=row.get("key")) from None
    return {r["key"]: r for r in rows}


def summary_line(report: dict[str, Any]) -> str:
    """One line: documents -> chunks -> instructions -> pairs -> records, with drops."""
    docs = report.get("documents", {})
    ins = report.get("instructions", {})
    rec = report.get("records", {})
    return (
        f"documents {docs.get('documents_kept', 0)} (skipped {docs.get('documents_skipped', {})})"
        f" -> chunks {docs.get('chunks', 0)} -> instructions {ins.get('instructions', 0)} "
        f"(chunk outcomes {ins.get('outcome', {})}) -> pairs kept {rec.get('pairs_kept', 0)}/"
        f"{rec.get('pairs', 0)} (dropped {rec.get('pairs_dropped', {})}) -> records "
        f"{rec.get('records', 0)} (turns dropped {rec.get('turns_dropped', {})})"
    )
