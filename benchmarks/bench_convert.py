"""HF ⇄ megatron conversion: wall time and peak memory against the model's own size.

Makes a random Mistral-shaped HF model (bf16 safetensors, 2 GB shards), then runs each direction
in a fresh process and reports its wall time, peak RSS and peak ANONYMOUS memory (sampled from
/proc every 20 ms; RSS also counts the memory-mapped safetensors pages, which the kernel can drop).
"libs" is the anonymous memory after imports; "extra / model" = (peak anon − libs) / model size:
1.0 means exactly one copy of the model is held.

    .venv/bin/python benchmarks/bench_convert.py [--hidden 2048 --layers 8 --dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _anon_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024**2
    return 0.0


def _child(kind: str, args: list[str]) -> None:
    """Run one conversion and print JSON {seconds, peak_rss_gb, peak_anon_gb, libs_gb}."""
    import threading

    sys.path.insert(0, str(ROOT))
    import megatron.core  # noqa: F401 - count library memory in the baseline
    import torch  # noqa: F401
    import transformers  # noqa: F401

    libs = _anon_gb()
    peak = [libs]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], _anon_gb())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    if kind == "make":
        import torch
        import transformers

        hidden, layers, dtype, out = int(args[0]), int(args[1]), args[2], args[3]
        cfg = transformers.MistralConfig(
            vocab_size=32000,
            hidden_size=hidden,
            intermediate_size=int(hidden * 3.5),
            num_hidden_layers=layers,
            num_attention_heads=hidden // 128,
            num_key_value_heads=max(1, hidden // 512),
            sliding_window=None,
        )
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        with torch.device("meta"):
            model = transformers.MistralForCausalLM(cfg)
        model = model.to_empty(device="cpu").to(torch_dtype)
        for p in model.parameters():
            p.data.normal_(0, 0.02)
        model.save_pretrained(out, max_shard_size="2GB")
    elif kind == "import":
        from longpo_megatron.export.convert import convert_hf_to_megatron

        convert_hf_to_megatron(args[0], args[1], progress=False)
    else:
        from longpo_megatron.export.convert import convert_megatron_to_hf

        convert_megatron_to_hf(args[0], args[1], progress=False)
    seconds = time.perf_counter() - t0
    time.sleep(0.05)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    out = {"seconds": seconds, "peak_rss_gb": rss, "peak_anon_gb": peak[0], "libs_gb": libs}
    print(json.dumps(out))


def _run(kind: str, *args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _size_gb(d: Path, pattern: str) -> float:
    return sum(p.stat().st_size for p in d.rglob(pattern)) / 1024**3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a.child[0], a.child[1:])
        return
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        _run("make", str(a.hidden), str(a.layers), a.dtype, str(t / "hf"))
        model_gb = _size_gb(t / "hf", "*.safetensors")
        rows = [("hf -> megatron", _run("import", str(t / "hf"), str(t / "mg")))]
        rows.append(("megatron -> hf", _run("export", str(t / "mg"), str(t / "hf2"))))
        print(f"model: hidden {a.hidden}, {a.layers} layers, {a.dtype}: {model_gb:.2f} GB")
        head = ("direction", "seconds", "peak RSS GB", "peak anon GB", "libs GB", "extra / model")
        print(f"{head[0]:<16}" + "".join(f"{h:>15}" for h in head[1:]))
        for name, r in rows:
            ratio = (r["peak_anon_gb"] - r["libs_gb"]) / model_gb
            vals = (r["seconds"], r["peak_rss_gb"], r["peak_anon_gb"], r["libs_gb"], ratio)
            print(f"{name:<16}" + "".join(f"{v:>15.2f}" for v in vals))


if __name__ == "__main__":
    main()
