"""``longpo-preprocess``: tokenize JSONL records once into a prepared dataset directory.

    longpo-preprocess data=longpo_128k data.path=recs.jsonl data.tokenizer=/models/tok \\
        --output recs.prepared [--workers 8]
    longpo-preprocess ... --output DIR --shard 3/8     # one Slurm array task
    longpo-preprocess ... --output DIR --merge         # join the finished shards

The source is cut into pieces of about ``--piece-mb`` MiB at line ends. Each piece becomes a
small prepared dataset under ``DIR/.work/`` (its ``metadata.json``, written last, marks it done),
so a killed run resumes with the pieces it has not finished, and shard ``i/n`` does the pieces
``p`` with ``p % n == i``. The merge concatenates the pieces in order (checking ids are unique
across them) into ``DIR`` and removes ``.work``. The result does not depend on the piece size,
the number of workers or shards. Training prepares a JSONL ``data.path`` the same way, once,
into a cache directory keyed by the content hash (:func:`prepared_for_run`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from longpo_megatron.data.prepared import (
    LIMIT_KEYS,
    METADATA,
    VERSION,
    PreparedDataError,
    PreparedDataset,
    PreparedWriter,
    identity_of,
    open_prepared,
    read_metadata,
    token_dtype,
    tokenizer_identity,
    write_metadata,
)
from longpo_megatron.data.records import (
    SCHEMA_VERSION,
    RecordError,
    _parse_line,
)
from longpo_megatron.data.render import render_record
from longpo_megatron.data.tokenizer import ChatTokenizer, build_tokenizer
from longpo_megatron.errors import UserError, report_user_errors

WORK = ".work"
PLAN = "plan.json"


class PreprocessError(UserError, ValueError):
    """A record or a preparation that cannot be used (the message names file, line and rule)."""


@dataclass(frozen=True)
class Job:
    """What one preparation needs; picklable so worker processes get it whole."""

    source: str
    tokenizer: str
    limits: dict[str, Any]
    piece_bytes: int


def _piece_dir(out: Path, p: int) -> Path:
    return out / WORK / f"piece-{p:06d}"


def scan_source(path: Path, piece_bytes: int) -> dict[str, Any]:
    """One pass over the source: sha256, size, and the pieces (byte range, first line)."""
    import hashlib

    h, pieces = hashlib.sha256(), []
    start = pos = 0
    line = first_line = 1
    with open(path, "rb") as f:
        for raw in f:
            h.update(raw)
            pos += len(raw)
            line += 1
            if pos - start >= piece_bytes:
                pieces.append([start, pos, first_line])
                start, first_line = pos, line
    if pos > start or not pieces:
        pieces.append([start, pos, first_line])
    return {"path": str(path.resolve()), "sha256": h.hexdigest(), "bytes": pos, "pieces": pieces}


def _base_metadata(job: Job, tok: ChatTokenizer, source: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "tokenizer": tokenizer_identity(tok),
        "source": {k: source[k] for k in ("path", "sha256", "bytes")},
        "limits": dict(job.limits),
        "token_dtype": token_dtype(tok.vocab_size).name,
    }


def _counts(table: np.ndarray, lines: int, skipped: int) -> dict[str, int]:
    long = int(table["long_chosen"].sum() + table["long_rejected"].sum())
    short = int(table["short_tokens"].sum())
    return {
        "lines": lines,
        "records": len(table),
        "skipped": skipped,
        "turns": int(table["turns"].sum()),
        "sequences": int(2 * len(table) + 2 * table["turns"].sum()),
        "long_tokens": long,
        "short_tokens": short,
        "tokens": long + short,
        "max_long": int(max(table["long_chosen"].max(), table["long_rejected"].max()))
        if len(table)
        else 0,
    }


def _piece_records(data: bytes, path: str, first_line: int):
    """(line, record or RecordError) for each non-blank line of a piece."""
    if first_line == 1 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for k, raw in enumerate(data.split(b"\n")):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            yield first_line + k, _parse_line(raw, path, first_line + k)
        except RecordError as err:
            yield first_line + k, err


def prepare_piece(job: Job, source: dict[str, Any], p: int, out: Path) -> dict[str, Any]:
    """Tokenize piece ``p`` into ``out/.work/piece-p``; returns counts (or a user error)."""
    try:
        return _prepare_piece(job, source, p, out)
    except UserError as err:  # worker exceptions do not pickle; carry the message
        return {"error": str(err)}


def _prepare_piece(job: Job, source: dict[str, Any], p: int, out: Path) -> dict[str, Any]:
    tok = _tokenizer(job.tokenizer)
    start, end, first_line = source["pieces"][p]
    with open(job.source, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    root = _piece_dir(out, p)
    shutil.rmtree(root, ignore_errors=True)
    writer = PreparedWriter(root, token_dtype(tok.vocab_size))
    skipped, lines = [], 0
    for line, rec in _piece_records(data, job.source, first_line):
        lines += 1
        if isinstance(rec, RecordError):
            raise rec
        try:
            pair = render_record(rec, len(writer.rows), tok, *_lengths(job))
        except RecordError as err:
            err = err.located(path=job.source)
            if job.limits["over_length_policy"] == "error":
                raise err from None
            skipped.append({"line": line, "reason": err.reason, "message": str(err)})
            continue
        writer.add_pair(pair, line)
    table = writer.finalize()
    meta = _base_metadata(job, tok, source)
    meta.update(piece=[p, len(source["pieces"])], skipped=skipped)
    meta["counts"] = _counts(table, lines, len(skipped))
    write_metadata(root, meta)
    return {"tokens": meta["counts"]["tokens"], "bytes": end - start}


def _lengths(job: Job) -> tuple[int, int]:
    return int(job.limits["max_seq_length"]), int(job.limits["max_ref_seq_length"])


_TOKENIZERS: dict[str, ChatTokenizer] = {}


def _tokenizer(name: str) -> ChatTokenizer:
    """One tokenizer per process (workers build their own)."""
    if name not in _TOKENIZERS:
        _TOKENIZERS[name] = build_tokenizer(name)
    return _TOKENIZERS[name]


def _job_record(job: Job, source: dict[str, Any]) -> dict[str, Any]:
    tok = tokenizer_identity(_tokenizer(job.tokenizer))
    return {
        "job": vars(job) | {"source": None},
        "tokenizer": tok,
        "source": source,
        "format": VERSION,  # pieces of an older format are not merged into a newer one
    }


def load_plan(job: Job, out: Path, source: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Scan the source; reuse (after checking) or write ``out/.work/plan.json``."""
    source = source or scan_source(Path(job.source), job.piece_bytes)
    plan = _job_record(job, source)
    path = out / WORK / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            what = [k for k in ("source", "tokenizer", "job", "format") if old.get(k) != plan[k]]
            raise PreparedDataError(
                f"{path}: an unfinished preparation of another {'/'.join(what)} is in "
                f"{out} (source sha256 {old['source']['sha256'][:12]} vs "
                f"{source['sha256'][:12]}); remove {out / WORK} or choose another --output"
            )
        return plan
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{PLAN}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(plan, sort_keys=True))
    tmp.replace(path)
    return plan


def _done(out: Path, p: int) -> bool:
    return (_piece_dir(out, p) / METADATA).is_file()


def run_pieces(job: Job, plan: dict[str, Any], out: Path, pieces: list[int], workers: int) -> int:
    """Prepare ``pieces`` (skipping finished ones) with a progress bar; returns tokens made."""
    from tqdm import tqdm

    source = plan["source"]
    todo = [p for p in pieces if not _done(out, p)]
    total = sum(source["pieces"][p][1] - source["pieces"][p][0] for p in todo)
    bar = tqdm(  # delay: a preparation done in seconds prints no bar (nor any line)
        total=total, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr, delay=5.0
    )
    tokens = 0
    args = [(job, source, p, out) for p in todo]
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        with mp.get_context(_start_method()).Pool(min(workers, len(todo))) as pool:
            tokens = _consume(pool.imap(_star_piece, args), bar)
    else:
        tokens = _consume(map(_star_piece, args), bar)
    bar.close()
    return tokens


def _start_method() -> str:
    """``fork`` (no re-import per worker) unless process groups and their threads are up."""
    import torch.distributed as dist

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # single encodes; fork-safe
    return "spawn" if dist.is_available() and dist.is_initialized() else "fork"


def _star_piece(args) -> dict[str, Any]:
    return prepare_piece(*args)


def _consume(results, bar) -> int:
    tokens = 0
    for res in results:
        if "error" in res:
            raise PreprocessError(res["error"])
        tokens += res["tokens"]
        rate = f"{tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s"
        bar.set_postfix_str(rate, refresh=False)  # shown by update(): honours the bar's delay
        bar.update(res["bytes"])
    return tokens


def merge(job: Job, plan: dict[str, Any], out: Path) -> dict[str, Any]:
    """Concatenate the finished pieces in order into ``out``; returns its metadata."""
    source = plan["source"]
    n = len(source["pieces"])
    missing = [p for p in range(n) if not _done(out, p)]
    if missing:
        raise PreprocessError(
            f"{out / WORK}: {len(missing)} of {n} pieces are not prepared yet (e.g. piece "
            f"{missing[0]}); run the missing shards, then --merge"
        )
    tok = _tokenizer(job.tokenizer)
    writer = PreparedWriter(out, token_dtype(tok.vocab_size))
    seen: dict[str, int] = {}
    skipped, lines = [], 0
    for p in range(n):
        piece = PreparedDataset(_piece_dir(out, p))
        skipped += piece.meta["skipped"]
        lines += piece.meta["counts"]["lines"]
        for i in range(len(piece)):
            rid, line = piece.record_id(i), int(piece.table["line"][i])
            if rid in seen:
                raise RecordError(
                    "duplicate_id",
                    f"id already used on line {seen[rid]}",
                    field="id",
                    path=job.source,
                    line=line,
                    record_id=rid,
                )
            seen[rid] = line
            toks = piece._read(piece.tokens, i, "crc_tokens", "tokens.bin")
            spans = piece._read(piece.spans, i, "crc_spans", "spans.bin")
            writer.add_raw(toks, spans, rid.encode("utf-8"), tuple(piece.table[i]))
    table = writer.finalize()
    meta = _base_metadata(job, tok, source)
    meta.update(skipped=sorted(skipped, key=lambda s: s["line"]))
    meta["counts"] = _counts(table, lines, len(skipped))
    meta = write_metadata(out, meta)
    shutil.rmtree(out / WORK, ignore_errors=True)
    return meta


def _existing(job: Job, out: Path, source: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The metadata of a finished dataset in ``out`` made by this job; refuse any other."""
    if not (out / METADATA).is_file():
        return None
    meta = read_metadata(out)
    tok = tokenizer_identity(_tokenizer(job.tokenizer))
    if meta["source"]["sha256"] != source["sha256"]:
        raise PreparedDataError(
            f"{out / METADATA}: prepared from another source file ({meta['source']['path']}, "
            f"sha256 {meta['source']['sha256'][:12]}) than {job.source} (sha256 "
            f"{source['sha256'][:12]}); choose another output directory"
        )
    same_tok = {k: meta["tokenizer"][k] for k in tok if k != "name"} == {
        k: v for k, v in tok.items() if k != "name"
    }
    if not same_tok or meta["limits"] != job.limits:
        raise PreparedDataError(
            f"{out / METADATA}: prepared from this source with another tokenizer or limits "
            f"({meta['limits']}); choose another output directory"
        )
    return meta


def prepare(
    job: Job,
    out: Path,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    do_merge: bool = True,
    source: Optional[dict[str, Any]] = None,
) -> Optional[dict[str, Any]]:
    """Prepare ``job`` into ``out``: this shard's pieces, then (``do_merge``) the merge."""
    source = source or scan_source(Path(job.source), job.piece_bytes)
    meta = _existing(job, out, source)
    if meta is not None:
        return meta
    plan = load_plan(job, out, source)
    index, count = shard
    pieces = [p for p in range(len(source["pieces"])) if p % count == index]
    run_pieces(job, plan, out, pieces, workers)
    return merge(job, plan, out) if do_merge else None


def job_for(data_cfg: Any, piece_mb: float = 64.0) -> Job:
    """The preparation that ``data_cfg`` (a :class:`DataConfig`) asks for."""
    limits = {k: getattr(data_cfg, k) for k in LIMIT_KEYS}
    limits["max_seq_length"] = int(limits["max_seq_length"])
    limits["max_ref_seq_length"] = int(limits["max_ref_seq_length"])
    return Job(
        str(Path(data_cfg.path).resolve()), str(data_cfg.tokenizer), limits, int(piece_mb * 2**20)
    )


def cache_entry(data_cfg: Any, source: dict[str, Any], tok: ChatTokenizer) -> Path:
    """Cache directory of a JSONL ``data.path``, keyed by its content and the tokenization."""
    ident = {k: v for k, v in tokenizer_identity(tok).items() if k != "name"}
    key = identity_of(
        {
            "source": {"sha256": source["sha256"]},
            "tokenizer": ident,
            "limits": job_for(data_cfg).limits,
        }
    )
    path = Path(data_cfg.path)
    root = Path(data_cfg.cache_dir) if data_cfg.cache_dir else path.parent / ".longpo-prepared"
    return root / f"{path.stem}-{key[:16]}"


def _prepare_cached(data_cfg: Any, tok: ChatTokenizer) -> Path:
    """Rank 0: the prepared cache entry of a JSONL ``data.path`` (made if missing)."""
    job = job_for(data_cfg)
    source = scan_source(Path(job.source), job.piece_bytes)
    entry = cache_entry(data_cfg, source, tok)
    _TOKENIZERS.setdefault(job.tokenizer, tok)
    if (entry / METADATA).is_file():
        _existing(job, entry, source)
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        prepare(job, tmp, workers=int(data_cfg.preprocess_workers), source=source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a refused preparation leaves nothing behind
        raise
    try:
        tmp.rename(entry)
    except OSError:  # another launch finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def prepared_for_run(data_cfg: Any, tok: ChatTokenizer) -> PreparedDataset:
    """The run's data as a :class:`PreparedDataset`: ``data.path`` is a prepared directory, or a
    JSONL file that global rank 0 prepares once into the cache while the other ranks wait."""
    import torch.distributed as dist

    path = Path(str(data_cfg.path))
    if path.is_dir():
        return open_prepared(path, tok, data_cfg)
    if not path.is_file():
        raise PreparedDataError(f"data.path={str(path)!r}: no such file or directory")
    distributed = dist.is_available() and dist.is_initialized()
    box: list[Any] = [None, None]
    if not distributed or dist.get_rank() == 0:
        try:
            box[0] = str(_prepare_cached(data_cfg, tok))
        except UserError as err:
            box[1] = str(err)
            if distributed:
                dist.broadcast_object_list(box, src=0)
            raise
    if distributed:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise PreprocessError(box[1])
    return open_prepared(box[0], tok, data_cfg)


def _parse_flags(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="longpo-preprocess", description=__doc__.split("\n")[0])
    ap.add_argument("--output", required=True, help="prepared dataset directory")
    ap.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    ap.add_argument("--shard", default="0/1", help="i/n: prepare only this shard's pieces")
    ap.add_argument("--merge", action="store_true", help="join the finished shards")
    ap.add_argument("--piece-mb", type=float, default=64.0, help="source MiB per piece")
    return ap.parse_known_args(argv)


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise PreprocessError(f"--shard {text!r}: must be i/n with integers") from None
    if n < 1 or not 0 <= i < n:
        raise PreprocessError(f"--shard {text!r}: needs 0 <= i < n")
    return i, n


@report_user_errors
def _run(flags: argparse.Namespace, data_cfg: Any) -> None:
    if flags.workers < 1 or flags.piece_mb <= 0:
        raise PreprocessError("--workers must be >= 1 and --piece-mb > 0")
    if not Path(str(data_cfg.path)).is_file():
        raise PreprocessError(f"data.path={data_cfg.path!r}: no such file")
    job = job_for(data_cfg, flags.piece_mb)
    shard = _shard(flags.shard)
    out = Path(flags.output)
    if flags.merge:
        source = scan_source(Path(job.source), job.piece_bytes)
        meta = _existing(job, out, source) or merge(job, load_plan(job, out, source), out)
    else:
        meta = prepare(job, out, flags.workers, shard, do_merge=shard[1] == 1)
    if meta is None:
        print(f"shard {shard[0]}/{shard[1]} prepared in {out / WORK}; run --merge when all are")
        return
    c = meta["counts"]
    print(
        f"prepared {out}: {c['records']} records, {c['tokens']} tokens "
        f"({meta['token_dtype']}), {c['skipped']} skipped; identity {meta['identity'][:16]}"
    )


def main() -> None:
    """Console entry point: flags here, every ``data.*`` key Hydra-style."""
    import hydra
    from omegaconf import DictConfig

    from longpo_megatron.config import register_configs, to_config

    root = Path(__file__).resolve().parents[2]
    os.environ.setdefault("LONGPO_ROOT", str(root))
    flags, rest = _parse_flags(sys.argv[1:])
    sys.argv[1:] = rest
    register_configs()

    @hydra.main(version_base="1.3", config_path=str(root / "conf"), config_name="config")
    def _hydra_main(dcfg: DictConfig) -> None:
        _run(flags, to_config(dcfg).data)

    _hydra_main()


if __name__ == "__main__":
    main()
