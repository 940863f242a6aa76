"""Helpers of ``scripts/gpu_check.sh``: what the device lacks, the versions it has, the summary.

Standard library only (it runs before anything is installed on the device)::

    python tools/gpu_check_report.py missing  --wheels "megatron-core==0.16.1:megatron.core ..."
    python tools/gpu_check_report.py versions --wheels "..." > versions.txt
    python tools/gpu_check_report.py summary  --out DIR --device TEXT --versions FILE \\
        --part tests=passed --part bench=stopped:time ...

``--wheels`` lists ``dist==version:module`` specs: the wheels carried in ``.whl/``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import importlib.util
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

OTHER_DEPS = (
    "torch",
    "numpy",
    "safetensors",
    "transformers",
    "tokenizers",
    "matplotlib",
    "tensorboard",
    "tqdm",
    "psutil",
    "pyyaml",
    "packaging",
    "pytest",
    "pytest-timeout",
)
"""The package's other dependencies (pyproject.toml) and the test runner: the image must have
them; a missing one is reported, not installed (nothing is reachable from the device)."""
OPTIONAL = ("transformer-engine", "transformer_engine")
"""Reported when present (the TE tests skip without it)."""


def parse_specs(text: str) -> list[tuple[str, str, str]]:
    """``"dist==ver:module ..."`` → ``[(dist, ver, module)]``; exits 2 on a malformed spec."""
    out = []
    for spec in text.split():
        req, _, module = spec.partition(":")
        dist, _, version = req.partition("==")
        if not (dist and version and module):
            sys.exit(f"error: GPU_CHECK_WHEELS entry {spec!r} is not dist==version:module")
        out.append((dist, version, module))
    return out


def installed(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def missing(specs: list[tuple[str, str, str]]) -> list[str]:
    """Specs whose exact version is not installed or whose module does not import."""
    return [
        f"{dist}=={ver}"
        for dist, ver, module in specs
        if installed(dist) != ver or importlib.util.find_spec(module.split(".")[0]) is None
    ]


def version_lines(specs: list[tuple[str, str, str]]) -> tuple[list[str], bool]:
    """One ``name  version  note`` line per package; False when a carried wheel is off."""
    lines, ok = [f"{'python':<24}{sys.version.split()[0]}"], True
    for dist, ver, _ in specs:
        got = installed(dist)
        good = got == ver
        ok &= good
        lines.append(f"{dist:<24}{got or 'MISSING':<14}{'' if good else f'(wanted {ver})'}")
    for dist in OTHER_DEPS:
        lines.append(f"{dist:<24}{installed(dist) or 'MISSING (not carried)'}")
    te = next((v for v in map(installed, OPTIONAL) if v), None)
    lines.append(f"{'transformer-engine':<24}{te or 'absent (TE tests skip)'}")
    return lines, ok


def junit_outcomes(path: Path) -> list[tuple[str, str, str]]:
    """``(test, outcome, message)`` per test case of a JUnit XML file."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                message = ((node.get("message") or "").splitlines() or [""])[0][:200]
                break
        out.append((name, outcome, message))
    return out


def _tests_section(out: Path) -> list[str]:
    xml = out / "junit-gpu.xml"
    if not xml.exists():
        return ["no JUnit XML (the tests did not start, or pytest was killed): see pytest.log"]
    rows = junit_outcomes(xml)
    counts: dict[str, int] = {}
    for _, outcome, _ in rows:
        counts[outcome] = counts.get(outcome, 0) + 1
    lines = [", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no tests ran", ""]
    lines += ["| test | outcome | message |", "| --- | --- | --- |"]
    lines += [f"| {n} | {o} | {m.replace('|', '/')} |" for n, o, m in rows]
    return lines


def _bench_section(out: Path) -> list[str]:
    table = out / "bench.md"
    if table.exists():
        return table.read_text().splitlines()
    data = out / "bench.json"
    if data.exists():
        return [f"bench.json only: {len(json.loads(data.read_text()).get('rows', []))} rows"]
    return ["no benchmark output"]


def summary(args: argparse.Namespace) -> int:
    """Write ``summary.md`` in ``--out`` and print it."""
    out = Path(args.out)
    parts = dict(p.split("=", 1) for p in args.part)
    lines = ["# GPU check", "", f"device: {args.device}", ""]
    lines += ["## parts", ""] + [f"- {k}: {v}" for k, v in parts.items()] + [""]
    if args.versions and Path(args.versions).exists():
        lines += ["## versions", "", "```", *Path(args.versions).read_text().splitlines(), "```"]
        lines += [""]
    lines += ["## tests (pytest -m gpu)", "", *_tests_section(out), ""]
    lines += ["## benchmark", "", *_bench_section(out), ""]
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("missing", "versions"):
        sub.add_parser(name).add_argument("--wheels", required=True)
    s = sub.add_parser("summary")
    s.add_argument("--out", required=True)
    s.add_argument("--device", required=True)
    s.add_argument("--versions")
    s.add_argument("--part", action="append", default=[], help="name=status")
    args = ap.parse_args(argv)
    if args.cmd == "missing":
        print("\n".join(missing(parse_specs(args.wheels))))
        return 0
    if args.cmd == "versions":
        lines, ok = version_lines(parse_specs(args.wheels))
        print("\n".join(lines))
        return 0 if ok else 1
    return summary(args)


if __name__ == "__main__":
    sys.exit(main())
