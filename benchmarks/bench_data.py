"""Data at scale: RSS per rank vs dataset size, preprocessing speed, launch-to-step-1 time.

    .venv/bin/python benchmarks/bench_data.py [--sizes 10M,100M,1G] [--workdir /tmp/bench_data]

1. RSS growth of one rank that opens a prepared dataset of each size and reads the pairs a DP
   rank of 8 reads in 4 steps of global batch 32 (synthetic records: 2 x 8K long tokens and 2
   turns of 2 x 1K short tokens each, written straight into the indexed files), side by side
   with today's in-memory JSONL loader at the smallest size.
2. Preprocessing tokens/s of ``longpo-preprocess`` on synthetic JSONL, byte tokenizer and a
   locally trained HF fast (byte-level BPE) tokenizer, 1 and 2 workers.
3. Launch to step 1 (``python -m longpo_megatron.train``, tiny model, CPU) on the largest
   prepared dataset with its initial-policy reference scores stored beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LONG, SHORT, TURNS = 8192, 1024, 2
PER_RECORD = 2 * LONG + 2 * TURNS * SHORT
LIMITS = {"max_seq_length": 16384, "max_ref_seq_length": 2048, "over_length_policy": "error"}


def _size(text: str) -> int:
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * mult[text[-1]]) if text[-1] in mult else int(text)


def _seq(rng: np.random.Generator, n: int, prompt: int) -> tuple[np.ndarray, np.ndarray]:
    toks = rng.integers(0, 256, n, dtype=np.uint16)
    return toks, np.array([prompt, n], dtype=np.int32)


def make_synthetic(root: Path, tokens: int) -> Path:
    """A prepared dataset of about ``tokens`` tokens written directly (byte tokenizer ids)."""
    from longpo_megatron.data.prepared import PreparedWriter, tokenizer_identity, write_metadata
    from longpo_megatron.data.preprocess import _counts
    from longpo_megatron.data.tokenizer import ByteChatTokenizer

    if (root / "metadata.json").is_file():
        return root
    rng = np.random.default_rng(0)
    n = max(1, tokens // PER_RECORD)
    writer = PreparedWriter(root, np.dtype(np.uint16))
    fp = np.zeros(32, np.uint8)
    for i in range(n):
        seqs = [_seq(rng, LONG, LONG // 2), _seq(rng, LONG, LONG // 2)]
        seqs += [_seq(rng, SHORT, SHORT // 2) for _ in range(2 * TURNS)]
        row = (i + 1, TURNS, LONG, LONG, 2 * TURNS * SHORT, 0, 0, fp, fp)
        writer.add_raw([t for t, _ in seqs], [s for _, s in seqs], f"syn-{i:07d}".encode(), row)
    table = writer.finalize()
    tok = ByteChatTokenizer()
    meta = {
        "schema_version": 1,
        "tokenizer": tokenizer_identity(tok),
        "source": {"path": f"synthetic-{tokens}", "sha256": f"{tokens:064x}", "bytes": 0},
        "limits": LIMITS,
        "token_dtype": "uint16",
        "skipped": [],
        "counts": _counts(table, n, 0),
    }
    write_metadata(root, meta)
    return root


RSS_CHILD = r"""
import json, os, sys
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
from longpo_megatron.config import DataConfig
from longpo_megatron.data.collate import collate_pairs
from longpo_megatron.data.dataset import load_dataset
from longpo_megatron.data.prepared import open_prepared
from longpo_megatron.data.sampler import PairSampler, slice_for_dp
from longpo_megatron.data.tokenizer import ByteChatTokenizer
import torch
import megatron.core.datasets.indexed_dataset  # imports are not data
path, mode = sys.argv[1], sys.argv[2]
tok = ByteChatTokenizer()
cfg = DataConfig(path=path, max_seq_length=16384, max_ref_seq_length=2048)
base = rss()
ds = open_prepared(path, tok, cfg) if mode == "prepared" else load_dataset(cfg, tok)[0]
opened = rss()
sampler = PairSampler(len(ds), 1234, True)
peak = opened
for _ in range(4):
    mine = slice_for_dp(sampler.next_global_batch(32), 3, 8)
    batch = collate_pairs([ds[i] for i in mine], tok.pad_id, 1, [(0.0, 0.0)] * len(mine))
    peak = max(peak, rss())
    del batch
tokens = sum(len(p.chosen) + len(p.rejected) + sum(len(s[0]) for s in p.ref_chosen + p.ref_rejected)
             for p in (ds[i] for i in range(len(ds)))) if mode == "jsonl" else 0
print(json.dumps(dict(pairs=len(ds), open_mb=opened - base, peak_mb=peak - base, tokens=tokens)))
"""


def rss_row(path: Path, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, str(path), mode], capture_output=True, text=True, env=env
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synthetic_jsonl(path: Path, records: int, doc_chars: int) -> Path:
    """JSONL of English-like synthetic records (for preprocessing speed)."""
    rng = np.random.default_rng(1)
    words = [
        "".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(4000)
    ]

    def text(n):
        out, size = [], 0
        while size < n:
            w = words[int(rng.integers(0, len(words)))]
            out.append(w)
            size += len(w) + 1
        return " ".join(out)

    with open(path, "w") as f:
        for i in range(records):
            turns = [
                {
                    "instruction": text(80),
                    "short_context": text(600),
                    "chosen": text(300),
                    "rejected": text(300),
                }
                for _ in range(TURNS)
            ]
            rec = {"schema_version": 1, "id": f"r{i}", "document": text(doc_chars), "turns": turns}
            f.write(json.dumps(rec) + "\n")
    return path


def preprocess_rows(work: Path) -> list[tuple[str, int, float, int]]:
    from longpo_megatron.config import DataConfig
    from longpo_megatron.data.preprocess import job_for, prepare
    from longpo_megatron.datagen.tiny_model import make_tiny_tokenizer

    src = synthetic_jsonl(work / "speed.jsonl", 64, 60_000)
    hf = make_tiny_tokenizer(work / "hf_tok", [src.read_text()[:2_000_000]], vocab_size=2048)
    rows = []
    for name, tok in (("byte", "byte"), ("HF fast BPE", str(hf))):
        for workers in (1, 2):
            cfg = DataConfig(path=str(src), tokenizer=tok, max_seq_length=200_000)
            cfg.max_ref_seq_length = 20_000
            out = work / f"speed-{name.split()[0]}-{workers}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            t0 = time.perf_counter()
            meta = prepare(job_for(cfg, piece_mb=0.5), out, workers=workers)
            elapsed = time.perf_counter() - t0
            rows.append(
                (name, workers, meta["counts"]["tokens"] / elapsed, meta["counts"]["tokens"])
            )
    return rows


def store_scores(root: Path) -> Path:
    """Initial-policy scores beside ``root`` for the run launched below (zeros, valid rows)."""
    from hydra import compose, initialize_config_dir

    from longpo_megatron.config import register_configs, to_config
    from longpo_megatron.data.prepared import PreparedDataset
    from longpo_megatron.reference.beside import store_beside
    from longpo_megatron.reference.store import header_for, reference_identity

    register_configs()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = to_config(compose("config", overrides=launch_overrides(root)))
    ds = PreparedDataset(root)
    path = store_beside(ds, reference_identity(cfg))
    path.parent.mkdir(exist_ok=True)
    with open(path, "w") as f:
        f.write(json.dumps(header_for(cfg)) + "\n")
        for i in range(len(ds)):
            row = {"id": ds.record_id(i), "fingerprint": ds.pair_fingerprint(i, "short")}
            f.write(json.dumps(row | {"chosen": [-1.0] * TURNS, "rejected": [-2.0] * TURNS}) + "\n")
    return path


def launch_overrides(root: Path) -> list[str]:
    return [
        f"data.path={root}",
        f"data.max_seq_length={LIMITS['max_seq_length']}",
        f"data.max_ref_seq_length={LIMITS['max_ref_seq_length']}",
        "model.max_position_embeddings=16384",
        "train.train_iters=1",
        "train.global_batch_size=1",
        "logging.tensorboard=false",
        "longpo.logits_chunk_size=4096",
    ]


def launch_row(root: Path, work: Path) -> tuple[float, float]:
    """Seconds from launch to the first step starting (setup done) and to step 1 logged."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-u", "-m", "longpo_megatron.train", *launch_overrides(root)]
    cmd.append(f"logging.output_dir={work}/run")
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    setup = step = float("nan")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("data:") and setup != setup:
            setup = time.perf_counter() - t0
        if line.startswith("step      1"):
            step = time.perf_counter() - t0
    if proc.wait():
        raise RuntimeError("".join(lines[-30:]))
    return setup, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="10M,100M,1G")
    ap.add_argument("--workdir", default="/tmp/bench_data")
    ap.add_argument("--skip-preprocess", action="store_true")
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [s.strip() for s in a.sizes.split(",")]
    print("| dataset | pairs | RSS after open (MB) | RSS peak, 4 steps of 1 DP rank of 8 (MB) |")
    print("|---|---|---|---|")
    roots = {}
    for s in sizes:
        t0 = time.perf_counter()
        reused = (work / f"syn-{s}" / "metadata.json").is_file()
        roots[s] = make_synthetic(work / f"syn-{s}", _size(s))
        build = "reused" if reused else f"written in {time.perf_counter() - t0:.0f} s"
        r = rss_row(roots[s], "prepared")
        name = f"prepared {s} tokens ({build})"
        print(f"| {name} | {r['pairs']} | {r['open_mb']:.1f} | {r['peak_mb']:.1f} |", flush=True)
    small = _size(sizes[0])
    src = synthetic_jsonl(work / "rss.jsonl", max(1, small // PER_RECORD), 6_000)
    r = rss_row(src, "jsonl")
    name = f"today's in-memory JSONL loader, {r['tokens'] / 1e6:.1f}M tokens"
    print(f"| {name} | {r['pairs']} | {r['open_mb']:.1f} | {r['peak_mb']:.1f} |", flush=True)
    if not a.skip_preprocess:
        print("\n| tokenizer | workers | tokens/s | tokens |\n|---|---|---|---|")
        for name, workers, rate, tokens in preprocess_rows(work):
            print(f"| {name} | {workers} | {rate:,.0f} | {tokens:,} |", flush=True)
    big = roots[sizes[-1]]
    store_scores(big)
    setup, step = launch_row(big, work)
    print(f"\n| launch on prepared {sizes[-1]} tokens + stored reference scores | seconds |")
    print(f"|---|---|\n| launch -> setup done (step 1 starts) | {setup:.1f} |")
    print(f"| launch -> step 1 logged (tiny model, 2 x 8K-token rows) | {step:.1f} |")


if __name__ == "__main__":
    main()
