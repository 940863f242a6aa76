"""Run the entry points on a table of cases, each in a forked child, and record what a user sees.

    python tests/user_error_runner.py CASES.json RESULTS.json

The parent imports every entry point once (torch, megatron, Hydra: the slow part), then per case
runs its ``prepare`` file operations, hashes the ``watch`` paths, forks a child that runs the
entry point with the case's argv and environment (stdout/stderr to files), waits, and hashes
the paths again. RESULTS.json: per case ``rc``, ``stderr``, ``stdout`` and ``changed`` (the
watched paths whose content changed).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("LONGPO_ROOT", str(ROOT))


def _entry_points() -> dict:
    from longpo_megatron import process, train
    from longpo_megatron.datagen import cli as datagen_cli
    from longpo_megatron.export import cli as export_cli
    from longpo_megatron.export import convert  # noqa: F401  (import before forking)
    from longpo_megatron.reference import cli as ref_cli
    from longpo_megatron.trainer import Trainer  # noqa: F401

    process.silence_fallback_warnings()
    return {
        "train": lambda argv: _hydra(train.main, "longpo-train", argv),
        "ref_logps": lambda argv: _hydra(ref_cli.main, "longpo-ref-logps", argv),
        "datagen": lambda argv: _hydra(datagen_cli.main, "longpo-datagen", argv),
        "hf2mg": export_cli.hf_to_megatron_main,
        "mg2hf": export_cli.megatron_to_hf_main,
    }


def _hydra(main, prog: str, argv: list[str]):
    sys.argv = [prog, *argv]
    return main()


def tree_hash(path: str) -> str:
    """Content hash of a file or a directory tree (names, bytes, symlink targets)."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_symlink():
        h.update(b"link:" + os.readlink(p).encode())
    elif p.is_file():
        h.update(p.read_bytes())
    elif p.is_dir():
        for sub in sorted(p.rglob("*")):
            h.update(str(sub.relative_to(p)).encode())
            if sub.is_symlink():
                h.update(b"link:" + os.readlink(sub).encode())
            elif sub.is_file():
                h.update(hashlib.sha256(sub.read_bytes()).digest())
    else:
        return "missing"
    return h.hexdigest()


def _prepare(op: str, *args) -> None:
    if op == "copytree":
        shutil.copytree(args[0], args[1], symlinks=True)
    elif op == "write":
        Path(args[0]).write_text(args[1])
    elif op == "write_bytes":
        Path(args[0]).write_bytes(bytes.fromhex(args[1]))
    elif op == "corrupt":  # 4 KiB of random bytes at an offset, size unchanged
        with open(args[0], "r+b") as f:
            f.seek(int(args[1]))
            f.write(random.Random(0).randbytes(min(4096, os.path.getsize(args[0]) - args[1])))
    elif op == "truncate":
        os.truncate(args[0], int(args[1]))
    elif op == "unlink":
        Path(args[0]).unlink()
    elif op == "symlink":
        os.symlink(args[0], args[1])
    elif op == "copy":
        shutil.copyfile(args[0], args[1])
    elif op == "set_line":  # replace 1-based line n
        lines = Path(args[0]).read_text().splitlines()
        lines[int(args[1]) - 1] = args[2]
        Path(args[0]).write_text("\n".join(lines) + "\n")
    elif op == "dup_line":  # append a copy of line n
        lines = Path(args[0]).read_text().splitlines()
        Path(args[0]).write_text("\n".join([*lines, lines[int(args[1]) - 1]]) + "\n")
    elif op == "add_to_value":  # row[key][0] += delta on line n (a hand edit of a score)
        lines = Path(args[0]).read_text().splitlines()
        row = json.loads(lines[int(args[1]) - 1])
        row[args[2]][0] += float(args[3])
        lines[int(args[1]) - 1] = json.dumps(row)
        Path(args[0]).write_text("\n".join(lines) + "\n")
    elif op == "mkdir":
        Path(args[0]).mkdir(parents=True, exist_ok=True)
    elif op == "manifest":  # what an attacker who edits files can also do
        from longpo_megatron.checkpoint import integrity

        (Path(args[0]) / integrity.MANIFEST).unlink(missing_ok=True)
        integrity.write_manifest(Path(args[0]), use_dist=False)
    else:
        raise ValueError(f"unknown prepare op {op!r}")


def _child(entry, case: dict, out: Path) -> None:
    for key in case.get("unset_env", []):
        os.environ.pop(key, None)
    os.environ.update(case.get("env", {}))
    for fd, name in ((1, "stdout"), (2, "stderr")):
        f = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    code = 0
    try:
        ret = entry(list(case["argv"]))
        code = ret if isinstance(ret, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_case(entry, case: dict, work: Path) -> dict:
    for op in case.get("prepare", []):
        _prepare(*op)
    before = {p: tree_hash(p) for p in case.get("watch", [])}
    out = work / case["name"]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        _child(entry, case, out)
    _, status = os.waitpid(pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    return {
        "rc": rc,
        "stdout": (out / "stdout").read_text(errors="replace"),
        "stderr": (out / "stderr").read_text(errors="replace"),
        "changed": [p for p in before if tree_hash(p) != before[p]],
        "seconds": time.perf_counter() - t0,
    }


def main() -> int:
    cases = json.loads(Path(sys.argv[1]).read_text())
    work = Path(sys.argv[2]).with_suffix(".d")
    entries = _entry_points()
    results = {c["name"]: run_case(entries[c["entry"]], c, work) for c in cases}
    Path(sys.argv[2]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
