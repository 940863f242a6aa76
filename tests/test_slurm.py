"""The Slurm scripts: syntax, headers, the one launcher's plumbing (container or not, NCCL
pass-through, run directories, resume, USR1 and exit-3 requeue, the LAUNCH variable, the
ablation grid) with fake ``srun``/``scontrol``/``sbatch`` (tests/slurm_fakes.py), overrides that
compose and validate for the GPUs the scripts allocate, and real CPU runs: the 128K template and
the whole self-evolution pipeline with the tiny model on 2 ranks, no container."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import slurm_fakes
from dist_harness import free_port
from hydra import compose, initialize_config_dir

from longpo_megatron import config_validation
from longpo_megatron.config import Config, register_configs, to_config
from longpo_megatron.config_validation import validate_config
from longpo_megatron.errors import REQUEUE_EXIT_CODE

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "slurm"
SCRIPTS = sorted(SLURM.glob("*.sh"))
STAGES = {"longpo_128k.sh": 1, "longpo_256k.sh": 2, "longpo_512k.sh": 2, "ablation.sh": 1}
"""Training scripts and their node counts."""
VARIANTS = {
    "longpo_128k.sh": ["", "qwen_128k", "llama3_1_128k"],
    "longpo_256k.sh": ["", "qwen_256k"],
}
"""EXPERIMENT values each script is also checked with ("" = the script's default)."""
TOY = str(ROOT / "data" / "toy" / "preference.jsonl")
TINY = ["parallel=dp2", "train.train_iters=2", "checkpoint.save_interval=1"]
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@pytest.fixture(scope="module", autouse=True)
def _schema() -> None:
    register_configs()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """Fakes on PATH; placeholders replaced by paths that exist."""
    e = slurm_fakes.install(tmp_path)
    for var in ("DATA", "HF_TOKENIZER", "INIT_CKPT"):
        (tmp_path / var.lower()).mkdir()
        e[var] = str(tmp_path / var.lower())
    e["FAKE_SRUN_RECORD"] = str(tmp_path / "srun.args")
    return e


def run_script(name: str, env: dict[str, str], *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SLURM / name), *args], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=kw.pop("timeout", 60), **kw,
    )  # fmt: skip


def srun_argv(env: dict[str, str]) -> list[str]:
    return Path(env["FAKE_SRUN_RECORD"]).read_text().splitlines()


def train_overrides(argv: list[str]) -> list[str]:
    return argv[argv.index("longpo_megatron.train") + 1 :]


def compose_overrides(overrides: list[str]) -> Config:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_config(compose("config", overrides=overrides))


def sbatch_value(text: str, option: str) -> str:
    """Value of ``#SBATCH --option=value`` (or a bare flag: the empty string)."""
    match = re.search(rf"^#SBATCH --{option}(?:=(\S+))?\s*$", text, re.MULTILINE)
    assert match, f"#SBATCH --{option} missing"
    return match.group(1) or ""


# --- static ---------------------------------------------------------------------------------


def test_there_are_the_scripts() -> None:
    names = {p.name for p in SCRIPTS}
    assert names >= set(STAGES) | {"launcher.sh", "datagen.sh", "convert.sh", "pipeline.sh"}
    assert (ROOT / "logs" / ".gitignore").is_file()  # sbatch --output=logs/... needs the dir


@needs_bash
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):
        lint = subprocess.run(
            ["shellcheck", "-x", "-P", str(ROOT), str(script)], capture_output=True, text=True
        )
        assert lint.returncode == 0, lint.stdout


@pytest.mark.parametrize("name", sorted(STAGES))
def test_sbatch_headers(name: str) -> None:
    text = (SLURM / name).read_text()
    assert int(sbatch_value(text, "nodes")) == STAGES[name]
    assert sbatch_value(text, "gpus-per-node") == "8"
    assert sbatch_value(text, "ntasks-per-node") == "1"
    assert "USR1@120" in sbatch_value(text, "signal")
    for flag in ("exclusive", "requeue", "time", "output"):
        sbatch_value(text, flag)
    assert 'source "${REPO}/slurm/launcher.sh"' in text and "longpo_train" in text


def test_launcher_requeue_code_is_the_trainers() -> None:
    text = (SLURM / "launcher.sh").read_text()
    assert f"LONGPO_REQUEUE_EXIT_CODE={REQUEUE_EXIT_CODE} " in text
    assert 'LAUNCH="${LAUNCH:-python -m longpo_megatron.launch}"' in text


# --- plumbing with a recording srun ------------------------------------------------------------


@needs_bash
@pytest.mark.parametrize(
    ("script", "experiment"),
    [(s, e) for s in sorted(STAGES) if s != "ablation.sh" for e in VARIANTS.get(s, [""])],
    ids=str,
)
def test_overrides_compose_and_validate_for_the_allocation(
    script: str, experiment: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if experiment:
        env["EXPERIMENT"] = experiment
    run = run_script(script, env, "longpo.beta=0.1")
    assert run.returncode == 0, run.stderr
    argv = srun_argv(env)
    assert argv[: argv.index("ignore-usr1") + 1] == ["bash", "-c", 'trap "" USR1; exec "$@"',
                                                     "ignore-usr1"]  # fmt: skip
    overrides = train_overrides(argv)
    assert overrides[-1] == "longpo.beta=0.1"
    monkeypatch.setattr(config_validation, "te_available", lambda: True)
    cfg = compose_overrides(overrides)
    assert cfg.data.path == env["DATA"] and cfg.checkpoint.load == env["INIT_CKPT"]
    world = STAGES[script] * 8
    layout = validate_config(cfg, world_size=world, cuda_available=True)
    assert layout.engine == "gpu" and layout.attention_backend == "te"
    assert layout.dp * layout.grad_accum == 8


@needs_bash
def test_container_is_optional_and_launch_is_one_variable(env: dict[str, str]) -> None:
    assert run_script("longpo_128k.sh", env).returncode == 0
    argv = srun_argv(env)
    assert not any(a.startswith("--container") for a in argv)
    assert argv[4:9] == ["python", "-m", "longpo_megatron.launch", "--nnodes", "1"]
    env.update(
        CONTAINER="nvcr.io#nvidia/pytorch:25.01-py3", LAUNCH="python -m torch.distributed.run"
    )
    srun_log = Path(env["FAKE_SLURM_DIR"]) / "srun-raw"
    bin_srun = Path(env["PATH"].split(":")[0]) / "srun"
    bin_srun.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {srun_log}\n')
    assert run_script("longpo_128k.sh", env).returncode == 0
    raw = srun_log.read_text().splitlines()
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in raw
    mounts = next(a for a in raw if a.startswith("--container-mounts="))
    assert f"{ROOT}:/workspace/longpo" in mounts and env["DATA"] in mounts
    assert raw[raw.index("ignore-usr1") + 1 : raw.index("ignore-usr1") + 4] == [
        "python", "-m", "torch.distributed.run",
    ]  # fmt: skip


@needs_bash
def test_nccl_variables_and_env_file_pass_through(env: dict[str, str], tmp_path: Path) -> None:
    site = tmp_path / "site.sh"
    site.write_text("NCCL_SOCKET_IFNAME=ib0\nFI_PROVIDER=efa\n")  # set, not exported
    env.update(NCCL_IB_HCA="mlx5_0,mlx5_1", LONGPO_ENV_FILE=str(site))
    run = run_script("longpo_128k.sh", env)
    assert run.returncode == 0, run.stderr
    passed = Path(env["FAKE_SRUN_RECORD"] + ".env").read_text().splitlines()
    assert {"NCCL_IB_HCA=mlx5_0,mlx5_1", "NCCL_SOCKET_IFNAME=ib0", "FI_PROVIDER=efa"} <= set(passed)
    assert "env NCCL_SOCKET_IFNAME=ib0" in run.stdout


@needs_bash
def test_run_directories_from_job_name_and_override_hash(env: dict[str, str]) -> None:
    def run_dir(*overrides: str) -> Path:
        assert run_script("longpo_128k.sh", env, *overrides).returncode == 0
        save = next(a for a in srun_argv(env) if a.startswith("checkpoint.save="))
        return Path(save.split("=", 1)[1]).parent

    a, b, a2 = run_dir("longpo.beta=0.1"), run_dir("longpo.beta=0.2"), run_dir("longpo.beta=0.1")
    assert a == a2 != b and a.parent == b.parent == Path(env["RUNS_ROOT"])
    assert re.fullmatch(r"longpo-test-[0-9a-f]{10}", a.name)
    assert (a / "overrides.txt").read_text().splitlines()[-1] == "longpo.beta=0.1"
    env["EXPERIMENT"] = "qwen_128k"
    assert run_dir("longpo.beta=0.1") not in (a, b)  # the experiment is part of the hash


@needs_bash
def test_resume_from_the_runs_own_checkpoints(env: dict[str, str]) -> None:
    assert run_script("longpo_128k.sh", env).returncode == 0
    assert f"checkpoint.load={env['INIT_CKPT']}" in train_overrides(srun_argv(env))
    save = next(a for a in srun_argv(env) if a.startswith("checkpoint.save="))
    ckpt = Path(save.split("=", 1)[1])
    (ckpt / "latest").write_text("iter_0000001")
    assert run_script("longpo_128k.sh", env).returncode == 0
    assert f"checkpoint.load={ckpt}" in train_overrides(srun_argv(env))


@needs_bash
@pytest.mark.parametrize("var", ["DATA", "HF_TOKENIZER"])
def test_unset_paths_are_refused(env: dict[str, str], var: str) -> None:
    del env[var]
    run = run_script("longpo_128k.sh", env)
    assert run.returncode == 2 and f"error: set {var}" in run.stderr


@needs_bash
@pytest.mark.parametrize(("code", "requeued"), [(REQUEUE_EXIT_CODE, True), (1, False), (0, False)])
def test_trainer_exit_code_3_requeues(env: dict[str, str], code: int, requeued: bool) -> None:
    env["FAKE_SRUN_EXIT"] = str(code)
    run = run_script("longpo_128k.sh", env)
    assert run.returncode == (0 if requeued else code)
    assert ("requeue 42" in slurm_fakes.events(env)) == requeued


@needs_bash
def test_usr1_forwards_to_trainers_then_requeues(env: dict[str, str]) -> None:
    """On USR1 the trainers are signalled first; requeue happens only after the step ends."""
    env["FAKE_SRUN_SLEEP"] = "3"
    proc = subprocess.Popen(
        ["bash", str(SLURM / "longpo_128k.sh")],
        env=env,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(100):
        if "step-start" in slurm_fakes.events(env):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    got = slurm_fakes.events(env)
    assert got[0] == "step-start"
    assert got[1].startswith("signal ") and "-USR1 -f [l]ongpo_megatron.train" in got[1]
    assert got[2:] == ["step-end", "requeue 42"]


@needs_bash
def test_ablation_grid_runs_one_set_per_array_task(env: dict[str, str]) -> None:
    grid = str(SLURM / "grids" / "beta_lambda.txt")
    lines = [ln for ln in Path(grid).read_text().splitlines() if ln and not ln.startswith("#")]
    dirs = set()
    for task in (1, 4):
        env["SLURM_ARRAY_TASK_ID"] = str(task)
        run = run_script("ablation.sh", env, grid, "train.seed=7")
        assert run.returncode == 0, run.stderr
        overrides = train_overrides(srun_argv(env))
        assert overrides[-len(lines[task].split()) - 1 :] == [*lines[task].split(), "train.seed=7"]
        dirs.add(next(a for a in overrides if a.startswith("checkpoint.save=")))
        compose_overrides(overrides)
    assert len(dirs) == 2
    env["SLURM_ARRAY_TASK_ID"] = str(len(lines))
    bad = run_script("ablation.sh", env, grid)
    assert bad.returncode == 2 and f"--array=0-{len(lines) - 1}" in bad.stderr


# --- real CPU runs (tiny model, 2 ranks, no container) -----------------------------------------


def _cpu_env(env: dict[str, str]) -> dict[str, str]:
    del env["FAKE_SRUN_RECORD"]
    env.update(EXPERIMENT="", DATA=TOY, HF_TOKENIZER="byte", INIT_CKPT="", NPROC_PER_NODE="2",
               MASTER_PORT=str(free_port()))  # fmt: skip
    return env


def _steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln)["step"] for ln in lines if '"step"' in ln]


@needs_bash
@pytest.mark.slow
@pytest.mark.distributed
def test_128k_template_trains_on_cpu_and_resumes(env: dict[str, str], tmp_path: Path) -> None:
    _cpu_env(env)
    env["RUN_DIR"] = str(tmp_path / "run")
    first = run_script("longpo_128k.sh", env, *TINY, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    env["MASTER_PORT"] = str(free_port())
    more = [o if o != "train.train_iters=2" else "train.train_iters=3" for o in TINY]
    second = run_script("longpo_128k.sh", env, *more, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"load {ckpt}" in second.stdout
    assert (ckpt / "latest").read_text().strip() == "iter_0000003"
    assert _steps(tmp_path / "run") == [1, 2, 3]  # resumed at 3, nothing repeated


def _stubs(tmp_path: Path, env: dict[str, str]) -> None:
    """A datagen stand-in (the real one needs a model that writes sensible text) that checks it
    got stage k's exported model; and, until ``longpo_megatron.data.preprocess`` exists on this
    branch, a preprocess stand-in that links the records as the 'prepared' dataset."""
    datagen = tmp_path / "datagen.sh"
    datagen.write_text(
        "#!/usr/bin/env bash\nset -e\nfor a; do case $a in backend.model=*) m=${a#*=};; "
        "output_dir=*) o=${a#*=};; stage=merge) merge=1;; esac\n"
        '[ "$prev" = --shard ] && s=$a; prev=$a; done\ntest -f "$m/config.json"\n'
        f'if [ -n "$merge" ]; then cp {TOY} "$o/records.jsonl"\n'
        'else touch "$o/shard-${s%/*}-of-${s#*/}"; fi\n'
    )
    env["DATAGEN"] = f"bash {datagen}"
    if importlib.util.find_spec("longpo_megatron.data.preprocess") is None:
        prep = tmp_path / "preprocess.sh"
        prep.write_text(
            "#!/usr/bin/env bash\nfor a; do case $a in data.path=*) src=${a#*=};; esac; done\n"
            'while [ "$1" != --output ]; do shift; done\nln -s "$src" "$2"\n'
        )
        env["PREPROCESS"] = f"bash {prep}"


@needs_bash
@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_chains_every_job_on_cpu(env: dict[str, str], tmp_path: Path) -> None:
    _cpu_env(env)
    _stubs(tmp_path, env)
    pipe = tmp_path / "pipe"
    env.update(PIPELINE_DIR=str(pipe), BASE_HF=str(tmp_path / "base_hf"), TOKENIZER="byte",
               DOCS=TOY, SHARDS="2", STAGES="128k 512k")  # fmt: skip
    run = run_script("pipeline.sh", env, *TINY, timeout=900)
    state = Path(env["FAKE_SLURM_DIR"])
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(state.glob("job-*.out")))
    assert run.returncode == 0, run.stderr + logs
    jobs = (pipe / "jobs.txt").read_text().splitlines()
    kinds = [" ".join(j.split()[1:3]) for j in jobs]
    assert kinds == ["train 128k", "convert 128k", "datagen 512k", "datagen merge",
                     "preprocess 512k", "train 512k", "convert 512k"]  # fmt: skip
    ids = [j.split()[0] for j in jobs]
    assert all((state / f"ok.{i}").exists() for i in ids), logs
    assert all(f"after {prev}" in j for prev, j in zip(ids, jobs[1:], strict=False))
    done = sorted(p.name for p in (pipe / "512k" / "datagen").glob("shard-*"))
    assert done == ["shard-0-of-2", "shard-1-of-2"]
    stage2 = (state / f"job-{ids[5]}.out").read_text()
    assert f"load {pipe / '128k' / 'weights'}" in stage2  # stage 2 starts from stage 1's model
    assert (pipe / "512k" / "train" / "checkpoints" / "latest").read_text().strip() == (
        "iter_0000002"
    )
    assert (pipe / "512k" / "hf" / "config.json").is_file()
