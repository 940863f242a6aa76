"""Prepared datasets: same pairs/batches as the JSONL path, shards, resume, and every refusal."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longpo_megatron.config import DataConfig
from longpo_megatron.data.collate import collate_pairs
from longpo_megatron.data.dataset import load_dataset
from longpo_megatron.data.prepared import PreparedDataError, PreparedDataset, open_prepared
from longpo_megatron.data.preprocess import (
    PreprocessError,
    cache_entry,
    job_for,
    load_plan,
    prepare,
    prepared_for_run,
    run_pieces,
    scan_source,
)
from longpo_megatron.data.records import RecordError
from longpo_megatron.data.tokenizer import ByteChatTokenizer, HFChatTokenizer
from longpo_megatron.errors import UserError
from tests.data.hf_templates import make_hf_tokenizer, record_texts

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "data" / "toy" / "preference.jsonl"
FILES = (
    "tokens.bin",
    "tokens.idx",
    "spans.bin",
    "spans.idx",
    "ids.bin",
    "ids.idx",
    "records.npy",
    "metadata.json",
)
PIECE_MB = 8 / 1024  # 8 KiB pieces: the 45 KB toy file becomes 6 pieces


def _cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def _job(path: Path = TOY, piece_mb: float = PIECE_MB, **kw):
    return job_for(_cfg(path, **kw), piece_mb)


def _bytes(root: Path) -> dict[str, bytes]:
    return {f: (root / f).read_bytes() for f in FILES}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prep") / "toy"
    prepare(_job(), out)
    return out


def test_pairs_and_batches_bitwise_equal_jsonl(prepared) -> None:
    tok = ByteChatTokenizer()
    ds = open_prepared(prepared, tok, _cfg(TOY))
    ref, report = load_dataset(_cfg(TOY), tok)
    assert len(ds) == len(ref) == 24 and ds.report().summary() == report.summary()
    for i in range(len(ref)):
        assert ds[i] == ref[i]
        for view in ("short", "long"):
            assert ds.pair_fingerprint(i, view) == ref.pair_fingerprint(i, view)
    for chunk in ([0, 1], [5, 17, 23], list(range(24))):
        scores = [(-1.5 * i, -2.25 * i) for i in chunk]
        a = collate_pairs([ds[i] for i in chunk], tok.pad_id, 8, scores)
        b = collate_pairs([ref[i] for i in chunk], tok.pad_id, 8, scores)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].equal(b[key]), key


def test_layout_uses_megatron_indexed_files(prepared) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    meta = json.loads((prepared / "metadata.json").read_text())
    tokens = IndexedDataset(str(prepared / "tokens"))
    assert meta["token_dtype"] == "uint16" and tokens.index.dtype == np.uint16
    assert len(tokens.document_indices) == 25 and meta["counts"]["sequences"] == len(tokens)
    spans = IndexedDataset(str(prepared / "spans"))
    assert spans.index.dtype == np.int32 and sum(spans.sequence_lengths) < len(tokens) * 8


def test_three_shards_and_merge_equal_one_shard(prepared, tmp_path) -> None:
    out = tmp_path / "sharded"
    job = _job()
    for i in range(3):
        assert prepare(job, out, shard=(i, 3), do_merge=False) is None
    prepare(job, out, shard=(0, 1))
    assert _bytes(out) == _bytes(prepared)
    assert not (out / ".work").exists()
    single = tmp_path / "one_piece"
    prepare(_job(piece_mb=64), single)  # one piece: output does not depend on piece size
    assert _bytes(single) == _bytes(prepared)


def test_resume_after_kill_is_byte_identical(prepared, tmp_path) -> None:
    out = tmp_path / "killed"
    job = _job()
    plan = load_plan(job, out)
    run_pieces(job, plan, out, [0, 2], workers=1)  # finished before the kill
    torn = out / ".work" / "piece-000003"
    torn.mkdir()
    (torn / "tokens.bin").write_bytes(b"\x01\x02")  # killed mid-piece: no metadata.json
    prepare(job, out)
    assert _bytes(out) == _bytes(prepared)


@pytest.mark.slow
def test_workers_cli_equal_to_api(prepared, tmp_path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "longpo_megatron.data.preprocess", f"data.path={TOY}"]
    cmd += ["--output", str(out), "--workers", "2", "--piece-mb", str(PIECE_MB)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "prepared" in proc.stdout and _bytes(out) == _bytes(prepared)


def test_skipped_records_listed_with_reasons(tmp_path) -> None:
    out = tmp_path / "skip"
    meta = prepare(_job(max_seq_length=900, over_length_policy="skip"), out)
    ds = open_prepared(
        out, ByteChatTokenizer(), _cfg(TOY, max_seq_length=900, over_length_policy="skip")
    )
    ref, report = load_dataset(
        _cfg(TOY, max_seq_length=900, over_length_policy="skip"), ByteChatTokenizer()
    )
    assert meta["counts"]["skipped"] == report.total_skipped > 0
    assert [s["line"] for s in meta["skipped"]] == [line for line, _ in report.problems]
    assert all(s["reason"] == "over_length" for s in meta["skipped"])
    assert [ds[i] for i in range(len(ds))] == [ref[i] for i in range(len(ref))]


def test_duplicate_id_across_pieces_refused(tmp_path) -> None:
    lines = TOY.read_text().splitlines()
    src = tmp_path / "dup.jsonl"
    src.write_text("\n".join(lines + [lines[0]]) + "\n")
    with pytest.raises(RecordError, match=r"dup.jsonl, line 25, record 'toy-0001'.*duplicate_id"):
        prepare(_job(src), tmp_path / "out")


def test_bad_record_refused_naming_line(tmp_path) -> None:
    src = tmp_path / "bad.jsonl"
    lines = TOY.read_text().splitlines()
    src.write_text("\n".join(lines[:10] + ['{"schema_version": 1, "id": "x"}'] + lines[10:]))
    with pytest.raises(PreprocessError, match=r"bad.jsonl, line 11, record 'x'.*missing_field"):
        prepare(_job(src), tmp_path / "out")


# ---- refusals of a damaged or mismatched prepared dataset -------------------------------------


def _copy(prepared: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(prepared, out)
    return out


@pytest.mark.parametrize(
    "name, damage, pattern",
    [
        ("tokens.bin", lambda b: b[:-10], r"tokens.bin: \d+ bytes, its index says \d+"),
        ("spans.bin", lambda b: b + b"\0", r"spans.bin: \d+ bytes, its index says"),
        ("tokens.idx", lambda b: b[:-8], r"tokens.idx: \d+ bytes, expected \d+ \(truncated"),
        ("tokens.idx", lambda b: b"XX" + b[2:], r"tokens.idx: header is not a megatron-core"),
        ("ids.idx", lambda b: b[:9] + b"\2" + b[10:], r"ids.idx: header is not a megatron-core"),
        ("records.npy", lambda b: b[:100], r"records.npy: "),
        ("metadata.json", lambda b: b.replace(b'"records": 24', b'"records": 23'), "identity"),
        ("metadata.json", lambda b: b[:50], r"metadata.json: not valid JSON"),
    ],
)
def test_damaged_files_refused(prepared, tmp_path, name, damage, pattern) -> None:
    out = _copy(prepared, tmp_path)
    (out / name).write_bytes(damage((out / name).read_bytes()))
    with pytest.raises(PreparedDataError, match=pattern) as err:
        PreparedDataset(out)
    assert str(out / name) in str(err.value)


def test_corrupted_tokens_refused_when_read(prepared, tmp_path) -> None:
    out = _copy(prepared, tmp_path)
    data = bytearray((out / "tokens.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (out / "tokens.bin").write_bytes(bytes(data))
    ds = PreparedDataset(out)
    bad = [i for i in range(len(ds)) if _fails(ds, i)]
    assert len(bad) == 1
    with pytest.raises(PreparedDataError, match=r"tokens.bin: record 'toy-\d+' .* CRC-32"):
        ds[bad[0]]


def _fails(ds, i) -> bool:
    try:
        ds[i]
    except PreparedDataError:
        return True
    return False


def test_tokenizer_template_and_limits_mismatch_refused(prepared, tmp_path) -> None:
    hf = make_hf_tokenizer(tmp_path / "qwen", "qwen2", record_texts(TOY))
    with pytest.raises(PreparedDataError, match=r"metadata.json: prepared with another tokenizer"):
        open_prepared(prepared, HFChatTokenizer(hf), _cfg(TOY))
    tok = ByteChatTokenizer()
    with pytest.raises(PreparedDataError, match=r"data.max_seq_length=2048"):
        open_prepared(prepared, tok, _cfg(TOY, max_seq_length=2048))
    other = tmp_path / "qwen_tpl"
    shutil.copytree(hf, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["chat_template"] = config.get("chat_template", "") + "{{ '' }}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    if (other / "chat_template.jinja").exists():
        text = (other / "chat_template.jinja").read_text()
        (other / "chat_template.jinja").write_text(text + "{{ '' }}")
    hf_out = tmp_path / "hf_prep"
    prepare(job_for(DataConfig(path=str(TOY), tokenizer=str(hf)), 64), hf_out)
    with pytest.raises(PreparedDataError, match=r"prepared with another chat template"):
        open_prepared(
            hf_out, HFChatTokenizer(other), DataConfig(path=str(TOY), tokenizer=str(other))
        )


def test_output_of_another_source_refused(prepared, tmp_path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(TOY.read_text().splitlines()[:5]) + "\n")
    out = _copy(prepared, tmp_path)
    with pytest.raises(
        PreparedDataError, match=r"metadata.json: prepared from another source file"
    ):
        prepare(_job(other), out)
    work = tmp_path / "work"
    load_plan(_job(), work)
    with pytest.raises(PreparedDataError, match=r"plan.json: an unfinished preparation of another"):
        prepare(_job(other), work)


def test_cache_prepared_once_and_refuses_foreign_entry(tmp_path, single_rank_group) -> None:
    src = tmp_path / "data.jsonl"
    shutil.copy(TOY, src)
    cfg = _cfg(src, cache_dir=str(tmp_path / "cache"))
    tok = ByteChatTokenizer()
    ds = prepared_for_run(cfg, tok)
    entry = cache_entry(cfg, scan_source(src, 1 << 26), tok)
    assert ds.root == entry and len(ds) == 24
    stamp = (entry / "tokens.bin").stat().st_mtime_ns
    assert prepared_for_run(cfg, tok).identity == ds.identity
    assert (entry / "tokens.bin").stat().st_mtime_ns == stamp  # not prepared again
    other = tmp_path / "other"
    prepare(_job(_five(tmp_path)), other)
    shutil.rmtree(entry)
    shutil.copytree(other, entry)
    with pytest.raises(UserError, match=r"metadata.json: prepared from another source file"):
        prepared_for_run(cfg, tok)


def _five(tmp_path: Path) -> Path:
    path = tmp_path / "five.jsonl"
    path.write_text("\n".join(TOY.read_text().splitlines()[:5]) + "\n")
    return path


def test_cli_refusal_is_one_line(tmp_path) -> None:
    out = tmp_path / "o"
    cmd = [
        sys.executable,
        "-m",
        "longpo_megatron.data.preprocess",
        f"data.path={tmp_path}/no.jsonl",
    ]
    proc = subprocess.run(cmd + ["--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data.path=")
    assert "Traceback" not in proc.stderr


def cache_worker(rank: int, world: int, *, src: str, cache: str, bad: str) -> dict:
    from dist_harness import init_gloo

    from longpo_megatron.errors import UserError

    init_gloo()
    tok = ByteChatTokenizer()
    ds = prepared_for_run(_cfg(Path(src), cache_dir=cache), tok)
    out = {"identity": ds.identity, "root": str(ds.root), "pair": ds[rank].record_id}
    try:
        prepared_for_run(_cfg(Path(bad), cache_dir=cache), tok)
    except UserError as err:
        out["error"] = (type(err).__name__, str(err))
    return out


@pytest.mark.slow
def test_rank0_prepares_others_wait(tmp_path) -> None:
    from dist_harness import run_distributed

    src, bad = tmp_path / "data.jsonl", tmp_path / "bad.jsonl"
    shutil.copy(TOY, src)
    bad.write_text(TOY.read_text().replace('"toy-0005"', '"toy-0004"'))
    kw = dict(src=str(src), cache=str(tmp_path / "cache"), bad=str(bad))
    res = run_distributed(cache_worker, 2, timeout_s=300, **kw)
    assert res[0]["identity"] == res[1]["identity"] and res[0]["root"] == res[1]["root"]
    assert [r["pair"] for r in res] == ["toy-0001", "toy-0002"]
    assert len(list((tmp_path / "cache").iterdir())) == 1  # prepared once, no leftovers
    # rank 0's refusal reaches every rank (no hang), with the same message
    assert res[0]["error"][1] == res[1]["error"][1]
    assert "bad.jsonl, line 5, record 'toy-0004'" in res[1]["error"][1]


def test_new_data_keys_validated(tmp_path) -> None:
    from longpo_megatron.config import Config
    from longpo_megatron.config_validation import ConfigError, validate_config

    cfg = Config()
    cfg.data.preprocess_workers = 0
    with pytest.raises(ConfigError, match=r"data.preprocess_workers=0: must be > 0"):
        validate_config(cfg, world_size=1, cuda_available=False)
    cfg = Config()
    (tmp_path / "f").write_text("")
    cfg.data.cache_dir = str(tmp_path / "f")
    with pytest.raises(ConfigError, match=r"data.cache_dir=.* is a file"):
        validate_config(cfg, world_size=1, cuda_available=False)


@pytest.mark.slow
def test_sigkill_then_rerun_is_byte_identical(tmp_path) -> None:
    """A real SIGKILL in the middle of the pieces; the rerun finishes the same bytes."""
    import os
    import signal
    import time

    lines = TOY.read_text().splitlines()
    src = tmp_path / "many.jsonl"
    many = [ln.replace('"toy-', f'"r{k}-') for k in range(12) for ln in lines]  # 288 records
    src.write_text("\n".join(many) + "\n")
    cmd = [sys.executable, "-m", "longpo_megatron.data.preprocess", f"data.path={src}"]
    cmd += ["--piece-mb", "0.002"]  # about one record per piece
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    proc = subprocess.Popen(cmd + ["--output", str(killed)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(killed.glob(".work/piece-*/metadata.json"))) < 5 and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(killed.glob(".work/piece-*/metadata.json")))
    assert 5 <= done < 288 and not (killed / "metadata.json").exists()
    for out in (killed, fresh):
        proc = subprocess.run(cmd + ["--output", str(out)], capture_output=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert _bytes(killed) == _bytes(fresh)


def test_hf_tokenizer_prepared_equals_jsonl(tmp_path) -> None:
    hf = make_hf_tokenizer(tmp_path / "mistral", "mistral", record_texts(TOY))
    cfg = DataConfig(path=str(TOY), tokenizer=str(hf))
    prepare(job_for(cfg, PIECE_MB), tmp_path / "out")
    tok = HFChatTokenizer(hf)
    ds = open_prepared(tmp_path / "out", tok, cfg)
    ref, _ = load_dataset(cfg, tok)
    assert [ds[i] for i in range(len(ds))] == [ref[i] for i in range(len(ref))]


def test_token_dtype_follows_vocabulary() -> None:
    from longpo_megatron.data.prepared import token_dtype

    assert token_dtype(264) == np.uint16 and token_dtype(32_000) == np.uint16
    assert token_dtype(128_256) == np.int32 and token_dtype(151_665) == np.int32
