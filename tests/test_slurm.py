"""The sbatch templates parse (``bash -n``) and pass Hydra overrides that compose and validate
for the GPUs they allocate."""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from longpo_megatron.config import Config, register_configs, to_config
from longpo_megatron.config_validation import validate_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh"))
SHELL_OPERATORS = {"&", "&&", "||", ";", "|"}
VARIANTS = {"longpo_128k.sh": [{}, {"EXPERIMENT": "qwen_128k"}]}
"""Variable settings each script is also checked with (the default settings always)."""


@pytest.fixture(scope="module", autouse=True)
def _schema() -> None:
    register_configs()


def defaults(text: str) -> dict[str, str]:
    """``VAR="${VAR:-default}"`` assignments at the top of a script."""
    pattern = re.compile(r'^(\w+)="\$\{\1:-(.*)\}"$', re.MULTILINE)
    return dict(pattern.findall(text))


def train_overrides(text: str, env: dict[str, str]) -> list[str]:
    """The Hydra overrides on the ``-m longpo_megatron.train`` command, variables expanded."""
    logical = text.replace("\\\n", " ").splitlines()
    lines = [line for line in logical if "-m longpo_megatron.train" in line]
    assert len(lines) == 1, "expected exactly one longpo_megatron.train launch"
    tokens = shlex.split(lines[0])
    out = []
    for tok in tokens[tokens.index("longpo_megatron.train") + 1 :]:
        if tok in SHELL_OPERATORS:
            break
        if tok == "$@":
            continue
        out.append(re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: _value(m, env), tok))
    return out


def _value(match: re.Match[str], env: dict[str, str]) -> str:
    name = match.group(1) or match.group(2)
    return env.get(name, f"/placeholder/{name}")


def sbatch_value(text: str, option: str) -> str:
    """Value of ``#SBATCH --option=value`` (or a bare flag: the empty string)."""
    match = re.search(rf"^#SBATCH --{option}(?:=(\S+))?\s*$", text, re.MULTILINE)
    assert match, f"#SBATCH --{option} missing"
    return match.group(1) or ""


def compose_overrides(overrides: list[str]) -> Config:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_config(compose("config", overrides=overrides))


def test_there_are_templates() -> None:
    assert {p.name for p in SCRIPTS} >= {"longpo_128k.sh", "longpo_512k.sh"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_sbatch_headers(script: Path) -> None:
    text = script.read_text()
    assert int(sbatch_value(text, "nodes")) >= 1
    assert sbatch_value(text, "gpus-per-node") == "8"
    assert sbatch_value(text, "ntasks-per-node") == "1"
    assert "USR1@120" in sbatch_value(text, "signal")
    for flag in ("exclusive", "requeue", "time", "output"):
        sbatch_value(text, flag)
    assert "--container-image=" in text and "trap on_usr1 USR1" in text
    assert re.search(r"--rdzv-backend c10d --rdzv-endpoint \"?\$\{?MASTER_ADDR\}?:29500", text)


@pytest.mark.parametrize(
    ("script", "variant"),
    [(s, v) for s in SCRIPTS for v in VARIANTS.get(s.name, [{}])],
    ids=lambda x: x.name if isinstance(x, Path) else ",".join(x) or "defaults",
)
def test_overrides_compose_and_validate(script: Path, variant: dict[str, str]) -> None:
    text = script.read_text()
    env = {**defaults(text), **variant}
    overrides = train_overrides(text, env)
    assert overrides[0].startswith("experiment=")
    cfg = compose_overrides(overrides)
    assert cfg.data.path == env["DATA"] and cfg.data.tokenizer == env["HF_TOKENIZER"]
    assert cfg.checkpoint.save == env["CKPT_DIR"] and cfg.checkpoint.load  # resumable
    assert cfg.checkpoint.save_interval > 0
    nproc = int(re.search(r"--nproc-per-node (\d+)", text).group(1))
    world = int(sbatch_value(text, "nodes")) * nproc
    assert nproc == int(sbatch_value(text, "gpus-per-node"))
    layout = validate_config(cfg, world_size=world, cuda_available=True)
    assert layout.world_size == world and layout.engine == "gpu"


def _fake_slurm(tmp_path: Path) -> dict[str, str]:
    """A PATH with stub ``scontrol``/``srun`` (srun records its argv) and the job's env."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node-a\necho node-b\n")
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/srun.args\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "42", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_CPUS_PER_TASK": "64"}  # fmt: skip
    for var in ("DATA", "HF_TOKENIZER", "CKPT_DIR", "INIT_CKPT", "OUT_DIR"):
        env[var] = str(tmp_path / var.lower())
    env["CONTAINER"] = "nvcr.io#nvidia/pytorch:25.01-py3"
    return env


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_runs_with_stub_slurm_and_resumes(script: Path, tmp_path: Path) -> None:
    env = _fake_slurm(tmp_path)

    def launch(*args: str) -> list[str]:
        run = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return (tmp_path / "srun.args").read_text().splitlines()

    argv = launch("longpo.beta=0.1")
    assert "--container-image=nvcr.io#nvidia/pytorch:25.01-py3" in argv
    assert argv[argv.index("--rdzv-endpoint") + 1] == "node-a:29500"
    overrides = argv[argv.index("longpo_megatron.train") + 1 :]
    assert f"checkpoint.load={env['INIT_CKPT']}" in overrides  # fresh start
    assert overrides[-1] == "longpo.beta=0.1"
    compose_overrides(overrides)
    (Path(env["CKPT_DIR"]) / "latest").write_text("1")
    resumed = launch()
    assert f"checkpoint.load={env['CKPT_DIR']}" in resumed  # requeued: resume


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_refuses_unset_paths(script: Path, tmp_path: Path) -> None:
    env = _fake_slurm(tmp_path)
    del env["DATA"]
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "set DATA" in run.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_usr1_forwards_to_trainers_then_requeues(script: Path, tmp_path: Path) -> None:
    """On USR1 the trainers are signalled first; requeue happens only after the step ends."""
    env = _fake_slurm(tmp_path)
    log, bin_dir = tmp_path / "events", tmp_path / "bin"
    (bin_dir / "srun").write_text(
        "#!/bin/sh\n"
        f'case "$*" in *pkill*) echo "signal $*" >> {log}; exit 0;; esac\n'
        f'printf "%s\\n" "$@" > {tmp_path}/srun.args\n'
        f"echo step-start >> {log}\nsleep 3\necho step-end >> {log}\n"
    )
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        f'case "$1" in requeue) echo "requeue $2" >> {log};; *) echo node-a; echo node-b;; esac\n'
    )
    proc = subprocess.Popen(["bash", str(script)], env=env, stderr=subprocess.PIPE, text=True)
    for _ in range(50):
        if log.exists() and "step-start" in log.read_text():
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    events = log.read_text().splitlines()
    assert events[0] == "step-start"
    assert events[1].startswith("signal ") and "-USR1 -f [l]ongpo_megatron.train" in events[1]
    assert events[2:] == ["step-end", "requeue 42"]
    argv = (tmp_path / "srun.args").read_text().splitlines()
    assert argv[argv.index("bash") + 1 : argv.index("torchrun")] == [
        "-c", 'trap "" USR1; exec "$@"', "ignore-usr1"
    ]  # fmt: skip
