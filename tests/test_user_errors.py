"""Every user mistake and fault of issue 12, as a user meets it: one line, exit 2, nothing lost.

Table-driven. Each case runs one entry point (train, ref-logps, datagen, both converters) on
prepared files and asserts

* the EXACT first line on stderr,
* the exit code,
* that every watched path (checkpoint directories, ``latest``, data files, HF folders, the
  marker a hostile pickle would create) hashes the same before and after.

All cases run in ONE helper process (tests/user_error_runner.py: imports once, forks per case),
so the table costs one start-up. docs/errors.md lists the same cases and messages.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "data" / "toy" / "preference.jsonl"
SHARD = "iter_0000002/__0_0.distcp"
MARKER = "/tmp/longpo-i12-pwned"


def _meta_gadget() -> str:
    """A .metadata reaching os.system through the DCP metadata module (the reported hole)."""

    def s(text: str) -> bytes:
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw

    body = s("torch.distributed.checkpoint.metadata") + s("os.system") + b"\x93"
    return (b"\x80\x04" + body + s(f"touch {MARKER}") + b"\x85R.").hex()


def _train(b: Path, *extra: str) -> list[str]:
    return [
        f"data.path={b}/data.jsonl", "train.train_iters=3", "train.global_batch_size=2",
        f"logging.output_dir={b}/run", "logging.tensorboard=false", *extra,
    ]  # fmt: skip


def _setup_cases(b: Path) -> list[dict]:
    return [
        dict(name="setup_train", entry="train", argv=_train(b, f"checkpoint.save={b}/ck",
             "train.train_iters=2")),
        dict(name="setup_store", entry="ref_logps",
             argv=_train(b, f"reference.path={b}/ref.jsonl")),
    ]  # fmt: skip


def _store_case(b: Path, name: str, op: list) -> dict:
    path = f"{b}/{name}.jsonl"
    return dict(
        name=name, entry="train", slow=True,
        prepare=[["copy", f"{b}/ref.jsonl", path], [op[0], path, *op[1:]]],
        argv=_train(b, "reference=precomputed", f"reference.path={path}"), watch=[path],
    )  # fmt: skip


def _cases(b: Path) -> list[dict]:
    """name, entry, argv, prepare ops, watched paths, expected first line (a function of b)."""
    ck = f"{b}/ck"
    it = "iter_0000002"
    c = [
        dict(name="lr_inf", entry="train", argv=_train(b, "optim.lr=inf"),
             first="error: optim.lr=inf: must be a finite number (not inf or nan)"),
        dict(name="data_env_unset", entry="train", argv=_train(b)[1:] + ["data=longpo_128k"],
             unset_env=["LONGPO_DATA", "LONGPO_TOKENIZER"],
             first="error: data.path: environment variable LONGPO_DATA is not set (the config "
                   "reads ${oc.env:LONGPO_DATA}); export it or override data.path=..."),
        dict(name="ref_env_unset", slow=True, entry="train",
             argv=_train(b, "reference=precomputed"),
             unset_env=["LONGPO_REF_LOGPS"],
             first="error: reference.path: environment variable LONGPO_REF_LOGPS is not set (the "
                   "config reads ${oc.env:LONGPO_REF_LOGPS}); export it or override "
                   "reference.path=..."),
        dict(name="one_record_big_batch", entry="train",
             argv=_train(b, f"data.path={b}/one.jsonl", "train.global_batch_size=8"),
             first=f"error: data.path='{b}/one.jsonl' holds 1 usable pair(s) but "
                   "train.global_batch_size=8: each step would repeat pairs within one batch; use "
                   "at least 8 records or lower train.global_batch_size"),
        dict(name="lone_surrogate", entry="train", argv=_train(b, f"data.path={b}/surrogate.jsonl"),
             first=f"error: {b}/surrogate.jsonl, line 1, record 'toy-0001': field "
                   "'turns[0].chosen': not encodable as UTF-8 (lone surrogate at 4) "
                   "[invalid_utf8]"),
        dict(name="save_root_is_a_file", entry="train", argv=_train(b, f"checkpoint.save={b}/file"),
             watch=[f"{b}/file"],
             first=f"error: checkpoint.save='{b}/file': is a file, not a directory"),
        dict(name="latest_binary", entry="train", argv=_train(b, f"checkpoint.load={b}/ck_bin"),
             prepare=[["copytree", ck, f"{b}/ck_bin"], ["write_bytes", f"{b}/ck_bin/latest",
                                                         "fffe0081"]],
             watch=[f"{b}/ck_bin"],
             first=f"error: {b}/ck_bin/latest: holds binary data, not the name of an "
                   "iter_XXXXXXX directory"),
        dict(name="corrupt_shard", entry="train", argv=_train(b, f"checkpoint.load={b}/ck_rand"),
             prepare=[["copytree", ck, f"{b}/ck_rand"], ["corrupt", f"{b}/ck_rand/{SHARD}", 1024]],
             watch=[f"{b}/ck_rand"],
             first=f"error: {b}/ck_rand/{SHARD}: checksum mismatch (the file changed after it "
                   "was saved: corrupt shard)"),
        dict(name="truncated_shard", entry="train", argv=_train(b, f"checkpoint.load={b}/ck_cut"),
             prepare=[["copytree", ck, f"{b}/ck_cut"], ["truncate", f"{b}/ck_cut/{SHARD}", 1000]],
             watch=[f"{b}/ck_cut"],
             first=lambda: f"error: {b}/ck_cut/{SHARD}: 1000 bytes, but "
                           f"{os.path.getsize(f'{ck}/{SHARD}')} were saved (truncated or "
                           "overwritten file)"),
        dict(name="truncated_shard_unchecked", slow=True, entry="train",
             argv=_train(b, f"checkpoint.load={b}/ck_cut2", "checkpoint.checksums=false"),
             prepare=[["copytree", ck, f"{b}/ck_cut2"], ["truncate", f"{b}/ck_cut2/{SHARD}", 1000]],
             watch=[f"{b}/ck_cut2"],
             first=lambda: f"error: {b}/ck_cut2/{SHARD}: truncated (1000 bytes, the checkpoint "
                           f"metadata needs {_needed(f'{ck}/{it}')})"),
        dict(name="truncated_common_unchecked", slow=True, entry="train",
             argv=_train(b, f"checkpoint.load={b}/ck_com", "checkpoint.checksums=false"),
             prepare=[["copytree", ck, f"{b}/ck_com"],
                      ["truncate", f"{b}/ck_com/{it}/common.pt", 100]],
             watch=[f"{b}/ck_com"],
             first=f"error: {b}/ck_com/{it}/common.pt: unreadable (truncated or corrupt file; "
                   "RuntimeError)"),
        dict(name="hostile_metadata_resume", entry="train",
             argv=_train(b, f"checkpoint.load={b}/ck_evil"),
             prepare=[["copytree", ck, f"{b}/ck_evil"],
                      ["write_bytes", f"{b}/ck_evil/{it}/.metadata", _meta_gadget()],
                      ["manifest", f"{b}/ck_evil/{it}"]],
             watch=[f"{b}/ck_evil", MARKER],
             first=f"error: {b}/ck_evil/{it}/.metadata: unreadable checkpoint metadata "
                   "(UnpicklingError: refusing to unpickle "
                   "'torch.distributed.checkpoint.metadata.os.system')"),
        dict(name="hostile_metadata_convert", entry="mg2hf",
             argv=[f"{b}/ck_evil", f"{b}/hf_evil", "--no-progress"],
             watch=[f"{b}/ck_evil", MARKER, f"{b}/hf_evil"],
             first=f"error: {b}/ck_evil/{it}/.metadata: unreadable checkpoint metadata "
                   "(UnpicklingError: refusing to unpickle "
                   "'torch.distributed.checkpoint.metadata.os.system')"),
        dict(name="ref_logps_onto_data", entry="ref_logps",
             argv=_train(b, f"reference.path={b}/data.jsonl"), watch=[f"{b}/data.jsonl"],
             first=f"error: reference.path='{b}/data.jsonl': is the input data file (data.path="
                   f"'{b}/data.jsonl'); the scores would overwrite the training data. Write them "
                   "to a new file"),
        dict(name="ref_logps_onto_user_file", slow=True, entry="ref_logps",
             argv=_train(b, f"reference.path={b}/notes.txt"), watch=[f"{b}/notes.txt"],
             first=f"error: reference.path='{b}/notes.txt': exists and is not a "
                   "longpo-ref-logps store (its first line is not a store header); refusing to "
                   "overwrite it. Remove it or choose a new file"),
        {**_store_case(b, "store_bad_json", ["set_line", 3, "{not json"]),
         "first": f"error: {b}/store_bad_json.jsonl, line 3: malformed JSON (Expecting property "
                  "name enclosed in double quotes)"},
        {**_store_case(b, "store_no_field", ["set_line", 2, '{"id": "toy-0001"}']),
         "first": f"error: {b}/store_no_field.jsonl, line 2: row has no 'fingerprint' field"},
        {**_store_case(b, "store_wrong_type", ["set_line", 2, "[1, 2]"]),
         "first": f"error: {b}/store_wrong_type.jsonl, line 2: not a score row (needs a string "
                  "id and fingerprint and non-empty lists of finite numbers 'chosen' and "
                  "'rejected')"},
        {**_store_case(b, "store_edited_value", ["add_to_value", 2, "chosen", 500]),
         "first": f"error: {b}/store_edited_value.jsonl, line 2, record 'toy-0001': values do "
                  "not match the row's checksum (the stored scores were edited); recompute them "
                  "with longpo-ref-logps"},
        {**_store_case(b, "store_duplicate_id", ["dup_line", 2]),
         "first": f"error: {b}/store_duplicate_id.jsonl, line 10: second row for record "
                  "'toy-0001' (first on line 2)"},
        dict(name="hf2mg_into_nonempty", entry="hf2mg", argv=[f"{b}/hf", f"{b}/other"],
             watch=[f"{b}/other", f"{b}/hf"],
             first=f"error: output directory '{b}/other' exists and is not empty; converters "
                   "only write a new or empty directory"),
        dict(name="hf2mg_into_source", entry="hf2mg", argv=[f"{b}/hf", f"{b}/hf"],
             watch=[f"{b}/hf"],
             first=f"error: output directory '{b}/hf' is or overlaps the input '{b}/hf'; write "
                   "the conversion to a separate new directory"),
        dict(name="hf2mg_through_symlink", entry="hf2mg", argv=[f"{b}/hf", f"{b}/link"],
             prepare=[["mkdir", f"{b}/empty"], ["symlink", f"{b}/empty", f"{b}/link"]],
             watch=[f"{b}/empty", f"{b}/link", f"{b}/hf"],
             first=f"error: output directory '{b}/link' is a symlink (to '{b}/empty'); "
                   "refusing to write through it: name a new directory"),
        dict(name="mg2hf_into_checkpoint", entry="mg2hf", argv=[ck, f"{ck}/hf_export"],
             watch=[ck],
             first=f"error: output directory '{ck}/hf_export' is or overlaps the input '{ck}'; "
                   "write the conversion to a separate new directory"),
        dict(name="convert_usage", entry="hf2mg", argv=[f"{b}/hf"],
             first="error: longpo-convert-hf-to-megatron: the following arguments are required: "
                   "out_dir (see longpo-convert-hf-to-megatron --help)"),
        dict(name="datagen_flag_without_value", entry="datagen", argv=["--shard"],
             first="error: longpo-datagen: --shard needs a value"),
        dict(name="diverged", slow=True, entry="train",
             argv=_train(b, "optim.lr=1e30", "optim.warmup_fraction=0", "train.train_iters=8",
                         "train.max_nonfinite_steps=3", f"checkpoint.save={b}/ck_nan",
                         "checkpoint.save_interval=1"),
             first="error: training diverged: 3 consecutive steps (2..4) had non-finite "
                   "gradients (grad norm nan); stopped without saving "
                   "(train.max_nonfinite_steps=3). Lower optim.lr, check the data, or resume "
                   "from the last checkpoint"),
    ]  # fmt: skip
    for case in c:
        case.setdefault("watch", [])
        case["watch"] = case["watch"] + [f"{b}/data.jsonl", ck]
    return c


def _needed(iter_dir: str) -> int:
    from longpo_megatron.checkpoint import storage

    md = storage.read_metadata(iter_dir)
    return max(i.offset + i.length for i in md.storage_data.values())


def _write_inputs(b: Path) -> None:
    lines = TOY.read_text().splitlines()
    (b / "data.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (b / "one.jsonl").write_text(lines[0] + "\n")
    rec = json.loads(lines[0])
    rec["turns"][0]["chosen"] = "The \ud800 answer"
    (b / "surrogate.jsonl").write_text(json.dumps(rec) + "\n")
    (b / "notes.txt").write_text("my notes, not a reference store\n")
    (b / "file").write_text("a file where the save root should be\n")
    for d in ("hf", "other"):
        (b / d).mkdir()
        (b / d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
        (b / d / "model.safetensors").write_bytes(b"\0" * 64)


def _run_table(b: Path, slow: bool) -> tuple[Path, dict, list[dict]]:
    """Run the setup cases and the (slow or default) error cases in one runner process."""
    _write_inputs(b)
    Path(MARKER).unlink(missing_ok=True)
    setup = _setup_cases(b)[: 2 if slow else 1]
    cases = setup + [c for c in _cases(b) if c.get("slow", False) == slow]
    table = [{k: v for k, v in c.items() if k not in ("first", "slow")} for c in cases]
    (b / "cases.json").write_text(json.dumps(table))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "user_error_runner.py"), str(b / "cases.json"),
         str(b / "results.json")], env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return b, json.loads((b / "results.json").read_text()), cases


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    return _run_table(tmp_path_factory.mktemp("user_errors"), slow=False)


@pytest.fixture(scope="module")
def slow_results(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    return _run_table(tmp_path_factory.mktemp("user_errors_slow"), slow=True)


def _check(results: tuple[Path, dict, list[dict]], name: str) -> None:
    _, res, cases = results
    case = next(c for c in cases if c["name"] == name)
    got = res[name]
    want = case["first"]() if callable(case["first"]) else case["first"]
    first = (got["stderr"].splitlines() or [""])[0]
    assert first == want, got["stderr"][-3000:]
    assert got["rc"] == 2, got["stderr"][-3000:]
    assert sum(ln.startswith("error:") for ln in got["stderr"].splitlines()) == 1
    assert "Traceback" not in got["stderr"]
    assert got["changed"] == [], f"changed on disk: {got['changed']}"
    assert not Path(MARKER).exists()


def test_setup_runs(results):
    got = results[1]["setup_train"]
    assert got["rc"] == 0, got["stderr"][-3000:]


@pytest.mark.slow
def test_slow_setup_runs(slow_results):
    for name in ("setup_train", "setup_store"):
        got = slow_results[1][name]
        assert got["rc"] == 0, got["stderr"][-3000:]


@pytest.mark.parametrize("name", [c["name"] for c in _cases(Path("/b")) if not c.get("slow")])
def test_user_error(results, name):
    _check(results, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [c["name"] for c in _cases(Path("/b")) if c.get("slow")])
def test_user_error_slow(slow_results, name):
    _check(slow_results, name)


@pytest.mark.parametrize(
    "module, argv, line",
    [
        ("longpo_megatron.train", ["optim.lr=inf"],
         "error: optim.lr=inf: must be a finite number (not inf or nan)"),
        ("longpo_megatron.reference.cli", [],
         "error: longpo-ref-logps: set reference.path=<output .jsonl>"),
    ],
)  # fmt: skip
def test_error_line_is_the_first_line_of_a_real_process(module, argv, line):
    """No import-time warning precedes the error line of a real ``python -m`` start."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("LONGPO_REF_LOGPS", None)
    proc = subprocess.run(
        [sys.executable, "-m", module, *argv], env=env,
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [line]


def test_nonfinite_guard_and_refused_save():
    import torch

    from longpo_megatron.numerics import NonFiniteError, NonFiniteGuard, refuse_nonfinite_save

    guard = NonFiniteGuard(2)
    guard.update(1, True, float("nan"))
    guard.update(2, False, 1.0)  # a finite step resets the streak
    guard.update(3, True, float("inf"))
    with pytest.raises(NonFiniteError, match=r"2 consecutive steps \(3\.\.4\)"):
        guard.update(4, True, float("inf"))
    refuse_nonfinite_save([torch.ones(3)], 7)
    with pytest.raises(NonFiniteError, match="refusing to save the checkpoint of step 7"):
        refuse_nonfinite_save([torch.ones(3), torch.tensor([1.0, float("nan")])], 7)


def test_pickle_of_the_gadget_is_what_the_table_says():
    """The hostile .metadata of the table names exactly the dotted global of the report."""
    import pickletools

    ops = [op.name for op, _, _ in pickletools.genops(bytes.fromhex(_meta_gadget()))]
    assert ops[:4] == ["PROTO", "SHORT_BINUNICODE", "SHORT_BINUNICODE", "STACK_GLOBAL"]
    assert pickle.HIGHEST_PROTOCOL >= 4
