"""scripts/gpu_check.sh on CPU, with CUDA faked out (GPU_CHECK_FAKE_CUDA): the no-GPU exit, the
decisions about what runs, the carried-wheel folder, and the layout of $OUT.

What only a GPU can show (the tests passing there, the benchmark numbers) is not proven here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check_report  # noqa: E402

FAKE_DIST = "longpo-fake-dep"
FAKE_SPEC = f"{FAKE_DIST}==1.0:longpo_fake_dep"


def _check(tmp_path: Path, timeout: int = 300, **env: str) -> tuple[int, str, Path]:
    """Run the script with ``env``; returns (exit code, output, $OUT)."""
    out = tmp_path / "out"
    full = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    full |= {"OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    full |= {"GPU_CHECK_SITE": str(tmp_path / "site"), **env}
    proc = subprocess.run(
        ["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, proc.stdout + proc.stderr, out


def _wheel(folder: Path, version: str) -> Path:
    """A minimal pure-Python wheel of the fake dependency."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"longpo_fake_dep-{version}"
    path = folder / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("longpo_fake_dep/__init__.py", f"__version__ = {version!r}\n")
        z.writestr(
            f"{name}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {FAKE_DIST}\nVersion: {version}\n",
        )
        z.writestr(
            f"{name}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{name}.dist-info/RECORD", "")
    return path


@pytest.mark.parametrize("script", ["gpu_check.sh", "fetch_gpu_wheels.sh"])
def test_scripts_parse_and_pass_shellcheck_when_available(script):
    path = ROOT / "scripts" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(path)], check=True)


def test_no_cuda_device_says_so_and_exits_0(tmp_path):
    """The real probe on this CPU-only machine (torch.cuda.is_available() is False)."""
    rc, log, out = _check(tmp_path)
    assert rc == 0, log
    assert "no CUDA device here: nothing to check" in log
    assert "no CUDA device" in (out / "summary.md").read_text()
    assert not (out / "junit-gpu.xml").exists()


def test_fake_no_cuda_exits_0_before_any_install(tmp_path):
    rc, log, _ = _check(tmp_path, GPU_CHECK_FAKE_CUDA="0", WHEEL_DIR=str(tmp_path / "none"))
    assert rc == 0 and "GPU_CHECK_FAKE_CUDA=0" in log and "install" not in log


def test_python_without_torch_is_a_clear_error(tmp_path):
    rc, log, _ = _check(tmp_path, PYTHON="false")
    assert rc == 2 and "cannot import torch" in log


def test_missing_wheel_folder_names_the_package_and_the_fix(tmp_path):
    rc, log, _ = _check(
        tmp_path,
        GPU_CHECK_FAKE_CUDA="1",
        GPU_CHECK_WHEELS=FAKE_SPEC,
        WHEEL_DIR=str(tmp_path / "absent"),
    )
    assert rc == 3, log
    assert f"not installed: {FAKE_DIST}==1.0" in log
    assert "scripts/fetch_gpu_wheels.sh" in log and "carry=" in log


def test_wrong_wheel_version_is_refused(tmp_path):
    _wheel(tmp_path / "whl", "2.0")
    rc, log, _ = _check(
        tmp_path,
        GPU_CHECK_FAKE_CUDA="1",
        GPU_CHECK_WHEELS=FAKE_SPEC,
        WHEEL_DIR=str(tmp_path / "whl"),
    )
    assert rc == 3, log
    assert "exactly one longpo_fake_dep-1.0-*.whl" in log
    assert "longpo_fake_dep-2.0-py3-none-any.whl" in log


def test_carried_wheel_is_installed_offline_and_its_version_checked(tmp_path):
    _wheel(tmp_path / "whl", "1.0")
    rc, log, out = _check(
        tmp_path,
        GPU_CHECK_FAKE_CUDA="1",
        GPU_CHECK_WHEELS=FAKE_SPEC,
        WHEEL_DIR=str(tmp_path / "whl"),
        GPU_CHECK_PARTS="",
    )
    assert rc == 0, log
    assert f"installing from {tmp_path / 'whl'}" in log
    assert (tmp_path / "site" / "longpo_fake_dep" / "__init__.py").exists()
    assert not (out / "pytest.log").exists()  # GPU_CHECK_PARTS="": no part runs
    versions = (out / "versions.txt").read_text()
    assert re.search(rf"^{FAKE_DIST}\s+1\.0\s*$", versions, re.M), versions
    assert re.search(r"^torch\s+\S", versions, re.M)


def test_installed_packages_are_not_reinstalled(tmp_path):
    """megatron-core, hydra, omegaconf, antlr4 are in this venv: nothing to install."""
    rc, log, _ = _check(tmp_path, GPU_CHECK_FAKE_CUDA="1", GPU_CHECK_PARTS="")
    assert rc == 0, log
    assert "already installed: nothing to install" in log


def test_parts_that_do_not_fit_the_budget_are_not_started(tmp_path):
    rc, log, out = _check(
        tmp_path, GPU_CHECK_FAKE_CUDA="1", GPU_CHECK_BUDGET_S="20", GPU_CHECK_MIN_PART_S="30"
    )
    assert rc == 4, log
    summary = (out / "summary.md").read_text()
    assert "- tests: NOT STARTED" in summary and "- bench: NOT STARTED" in summary
    assert not (out / "pytest.log").exists() and not (out / "bench.log").exists()


def _slow_tier(tmp_path: Path) -> Path:
    """A stand-in test tier: one fast test, one that hangs for two minutes."""
    target = tmp_path / "test_slow_tier.py"
    target.write_text(
        "import time\nimport pytest\npytestmark = pytest.mark.gpu\n"
        "def test_fast():\n    pass\n"
        "def test_slow():\n    time.sleep(120)\n"
    )
    return target


def _junit(out: Path) -> dict[str, str]:
    rows = gpu_check_report.junit_outcomes(out / "junit-gpu.xml")
    return {name.split("::")[-1]: outcome for name, outcome, _ in rows}


def test_a_hanging_test_fails_alone(tmp_path):
    rc, log, out = _check(
        tmp_path,
        GPU_CHECK_FAKE_CUDA="1",
        GPU_CHECK_PARTS="tests",
        GPU_CHECK_TESTS=str(_slow_tier(tmp_path)),
        GPU_CHECK_TEST_TIMEOUT_S="3",
    )
    assert rc == 1, log
    assert _junit(out) == {"test_fast": "passed", "test_slow": "FAILED"}
    assert "- tests: FAILED (pytest exit 1)" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_tests_cut_by_the_budget_keep_the_finished_outcomes(tmp_path):
    """SIGINT at the budget: pytest still writes the JUnit XML of the tests that finished."""
    target = _slow_tier(tmp_path)
    rc, log, out = _check(
        tmp_path,
        GPU_CHECK_FAKE_CUDA="1",
        GPU_CHECK_PARTS="tests",
        GPU_CHECK_TESTS=str(target),
        GPU_CHECK_BUDGET_S="15",
        GPU_CHECK_BENCH_S="0",
        GPU_CHECK_MIN_PART_S="1",
    )
    assert rc == 4, log
    summary = (out / "summary.md").read_text()
    assert "- tests: STOPPED by the time budget" in summary
    assert _junit(out).get("test_fast") == "passed"


def test_unknown_part_is_refused(tmp_path):
    rc, log, _ = _check(tmp_path, GPU_CHECK_FAKE_CUDA="1", GPU_CHECK_PARTS="nonsense")
    assert rc == 2 and "unknown part 'nonsense'" in log


@pytest.mark.slow
def test_full_fake_run_writes_the_out_layout(tmp_path):
    """Tests (all skip on CPU) and the CPU-smoke benchmark; what comes back from $OUT."""
    rc, log, out = _check(tmp_path, timeout=500, GPU_CHECK_FAKE_CUDA="1")
    assert rc == 0, log
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "bench.json",
            "bench.log",
            "bench.md",
            "check.log",
            "junit-gpu.xml",
            "pytest.log",
            "summary.md",
            "versions.txt",
        ]
    )
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)  # the device tool's rule
    outcomes = gpu_check_report.junit_outcomes(out / "junit-gpu.xml")
    assert len(outcomes) >= 10 and {o for _, o, _ in outcomes} == {"skipped"}
    bench = json.loads((out / "bench.json").read_text())
    assert bench["meta"]["complete"] and len(bench["rows"]) == 4
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in bench["rows"])
    summary = (out / "summary.md").read_text()
    assert "- tests: ran" in summary and "- bench: ran" in summary
    assert "| project | 128 | full |" in summary  # the benchmark table is in the summary
    assert "test_megatron_engine_matches_project_engine" in summary


def test_junit_outcomes_and_summary(tmp_path):
    (tmp_path / "junit-gpu.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_a"/>'
        '<testcase classname="tests.test_gpu" name="test_b">'
        '<failure message="assert 1 == 2&#10;more">trace</failure></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c">'
        '<skipped message="needs TE"/></testcase>'
        "</testsuite></testsuites>"
    )
    rows = gpu_check_report.junit_outcomes(tmp_path / "junit-gpu.xml")
    assert rows == [
        ("tests.test_gpu::test_a", "passed", ""),
        ("tests.test_gpu::test_b", "FAILED", "assert 1 == 2"),
        ("tests.test_gpu::test_c", "skipped", "needs TE"),
    ]
    gpu_check_report.main(
        ["summary", "--out", str(tmp_path), "--device", "X", "--part", "tests=ran (exit 1)"]
    )
    text = (tmp_path / "summary.md").read_text()
    assert "1 FAILED, 1 passed, 1 skipped" in text and "no benchmark output" in text


def test_bench_stops_at_the_deadline_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--cpu-smoke"]
        + ["--deadline", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 4, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert not data["meta"]["complete"]
    assert data["rows"][0]["status"].startswith("not started")


def test_bench_estimate_grows_with_length():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_gpu

    rows = [{"impl": "project", "seq": 8192, "status": "ok", "wall_s": 10.0}]
    assert bench_gpu.estimate_s(rows, "project", 32768) == pytest.approx(80.0)
    assert bench_gpu.estimate_s(rows, "authors", 32768) is None
    assert bench_gpu.peak_flops("NVIDIA H200") == 989e12
    assert bench_gpu.peak_flops("Some GPU") is None
    assert 0.95e9 < bench_gpu.parameters(bench_gpu.MISTRAL_1B) < 1.05e9
