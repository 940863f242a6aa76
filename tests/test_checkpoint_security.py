"""The checkpoint ``.metadata`` unpickler runs no code: crafted pickles of every protocol.

Each hostile pickle would, if resolved, create a marker file (through ``os.system``, ``exec``,
``subprocess``...). The test asserts the load is refused with a :class:`CheckpointError` naming
the file AND that the marker does not exist. A genuine DCP ``Metadata`` still round-trips at
every protocol, so the allow-list is not simply refusing everything.
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path, PosixPath

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from longpo_megatron.checkpoint import CheckpointError, storage

PROTOCOLS = range(0, pickle.HIGHEST_PROTOCOL + 1)


def _str_op(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def _stack_global_call(module: str, name: str, arg: str, proto: int = 4) -> bytes:
    """PROTO n; module name STACK_GLOBAL; (arg,) REDUCE; STOP -- by hand, any dotted name."""
    return (
        b"\x80" + bytes([proto]) + _str_op(module) + _str_op(name) + b"\x93"
        + _str_op(arg) + b"\x85" + b"R" + b"."
    )  # fmt: skip


def _global_call(module: str, name: str, arg: str, proto: int = 0) -> bytes:
    """[PROTO n;] GLOBAL 'module\\nname'; MARK arg TUPLE REDUCE STOP (protocol 0 text opcodes)."""
    head = b"" if proto < 2 else b"\x80" + bytes([proto])
    return head + f"c{module}\n{name}\n(V{arg}\ntR.".encode()


class _Gadget:
    """Pickles as ``func(*args)`` (the classic __reduce__ gadget)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _hostile(marker: Path) -> list[tuple[str, bytes]]:
    cmd = f"touch {marker}"
    meta = "torch.distributed.checkpoint.metadata"
    py = f"open({str(marker)!r}, 'w').close()"
    cases = [
        # the reported hole: os reached through an allowed module's attribute (dotted name)
        ("dotted os.system via metadata", _stack_global_call(meta, "os.system", cmd)),
        ("dotted via torch", _stack_global_call("torch", "os.system", cmd)),
        ("dotted via mcore", _stack_global_call(
            "megatron.core.dist_checkpointing.strategies.torch", "os.system", cmd)),
        ("dotted builtins via metadata", _stack_global_call(meta, "__builtins__.exec", py)),
        ("submodule path", _stack_global_call(f"{meta}.os", "system", cmd)),
        ("os.system direct", _stack_global_call("os", "system", cmd)),
        ("posix.system", _stack_global_call("posix", "system", cmd)),
        ("builtins.exec", _stack_global_call("builtins", "exec", py)),
        ("builtins.eval", _stack_global_call("builtins", "eval", py)),
        ("builtins.__import__", _stack_global_call("builtins", "__import__", "os")),
        ("builtins.getattr", _stack_global_call("builtins", "getattr", "x")),
        ("torch function", _stack_global_call("torch", "load", str(marker))),
        ("metadata module function", _stack_global_call(meta, "field", "x")),
        ("metadata.Enum base", _stack_global_call(meta, "Enum", "x")),
        ("subprocess", _stack_global_call("subprocess", "getoutput", cmd)),
    ]
    for proto in (0, 1, 2, 3):
        cases.append((f"GLOBAL dotted p{proto}", _global_call(meta, "os.system", cmd, proto)))
        cases.append((f"GLOBAL os.system p{proto}", _global_call("os", "system", cmd, proto)))
    for proto in PROTOCOLS:
        cases.append((f"reduce os.system p{proto}", pickle.dumps(_Gadget(os.system, cmd), proto)))
        cases.append((f"reduce exec p{proto}", pickle.dumps(_Gadget(exec, py), proto)))
        nested = Metadata(state_dict_metadata={"x": _Gadget(os.system, cmd)})  # inside a good one
        cases.append((f"nested gadget p{proto}", pickle.dumps(nested, proto)))
    cases.append(("persistent id", b"\x80\x04" + _str_op("x") + b"Q."))
    cases.append(("truncated", pickle.dumps(Metadata(state_dict_metadata={}), 4)[:-3]))
    cases.append(("garbage", struct.pack("<8d", *range(8))))
    return cases


def _ckpt_with_metadata(tmp_path: Path, data: bytes) -> Path:
    ckpt = tmp_path / "iter_0000001"
    ckpt.mkdir(exist_ok=True)
    (ckpt / ".metadata").write_bytes(data)
    return ckpt


def test_hostile_metadata_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    cases = _hostile(marker)
    assert len(cases) > 30
    for what, data in cases:
        ckpt = _ckpt_with_metadata(tmp_path, data)
        with pytest.raises(CheckpointError, match=r"\.metadata: ") as err:
            storage.tensor_shapes(ckpt)
        assert not marker.exists(), f"{what}: code ran while unpickling"
        assert str(ckpt / ".metadata") in str(err.value), what


def test_dotted_name_refusal_message(tmp_path):
    data = _stack_global_call("torch.distributed.checkpoint.metadata", "os.system", "true")
    ckpt = _ckpt_with_metadata(tmp_path, data)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle '.*metadata\.os\.system'"):
        storage.read_metadata(ckpt)


def _genuine(tmp_path: Path) -> Metadata:
    (tmp_path / "__0_0.distcp").write_bytes(b"\0" * 64)
    props = TensorProperties(dtype=torch.bfloat16)
    chunk = ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 4]))
    return Metadata(
        state_dict_metadata={
            "model.w": TensorStorageMetadata(props, torch.Size([2, 4]), [chunk]),
            "blob": BytesStorageMetadata(),
        },
        storage_data={
            MetadataIndex("model.w", torch.Size([0, 0])): _StorageInfo("__0_0.distcp", 0, 48),
            MetadataIndex("blob"): _StorageInfo("__0_0.distcp", 48, 16),
        },
        storage_meta=StorageMeta(checkpoint_id=PosixPath(tmp_path)),
    )


@pytest.mark.parametrize("proto", PROTOCOLS)
def test_genuine_metadata_round_trips_at_every_protocol(tmp_path, proto):
    ckpt = _ckpt_with_metadata(tmp_path, b"")
    md = _genuine(ckpt)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md, proto))
    assert storage.tensor_shapes(ckpt) == {"model.w": ((2, 4), torch.bfloat16)}
    back = storage.read_metadata(ckpt)
    assert back.storage_data == md.storage_data


def test_truncated_data_file_is_named(tmp_path):
    ckpt = _ckpt_with_metadata(tmp_path, b"")
    (ckpt / ".metadata").write_bytes(pickle.dumps(_genuine(ckpt), 4))
    (ckpt / "__0_0.distcp").write_bytes(b"\0" * 50)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: truncated \(50 bytes.*needs 64\)"):
        storage.tensor_shapes(ckpt)


def test_metadata_cannot_point_outside_the_checkpoint(tmp_path):
    ckpt = _ckpt_with_metadata(tmp_path, b"")
    md = _genuine(ckpt)
    key = next(iter(md.storage_data))
    md.storage_data[key] = _StorageInfo("../../etc/passwd", 0, 1)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md, 4))
    with pytest.raises(CheckpointError, match="bad data file name '../../etc/passwd'"):
        storage.tensor_shapes(ckpt)


# ---- integrity: checksum manifest, save-root probe, unreadable `latest` -----------------------


def test_checksum_manifest_names_the_changed_file(tmp_path, capsys):
    from longpo_megatron.checkpoint import integrity

    ckpt = tmp_path / "iter_0000001"
    ckpt.mkdir()
    (ckpt / "a.distcp").write_bytes(b"a" * 5000)
    (ckpt / "common.pt").write_bytes(b"c" * 10)
    assert integrity.verify(ckpt, use_dist=False) is False  # no manifest yet
    integrity.check(ckpt, True, use_dist=False)
    assert "has no checksums.json: loading it unverified" in capsys.readouterr().out
    integrity.write_manifest(ckpt, use_dist=False)
    assert integrity.verify(ckpt, use_dist=False) is True
    with open(ckpt / "a.distcp", "r+b") as f:  # same size, one byte flipped
        f.seek(4000)
        f.write(b"b")
    with pytest.raises(CheckpointError, match=r"a\.distcp: checksum mismatch"):
        integrity.verify(ckpt, use_dist=False)
    integrity.check(ckpt, False, use_dist=False)  # checkpoint.checksums=false: not read
    (ckpt / "a.distcp").write_bytes(b"a" * 5000)
    integrity.verify(ckpt, use_dist=False)
    (ckpt / "common.pt").unlink()
    with pytest.raises(CheckpointError, match=r"common\.pt: listed in checksums\.json but missing"):
        integrity.verify(ckpt, use_dist=False)


def test_save_root_is_probed_before_training(tmp_path):
    from longpo_megatron.checkpoint.paths import check_save_root

    check_save_root(tmp_path / "new" / "ckpts")  # creatable: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    check_save_root(tmp_path)  # existing and writable: the probe file is gone afterwards
    assert list(tmp_path.iterdir()) == [tmp_path / "new"] or list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match=r"checkpoint.save='.*/f': is a file"):
        check_save_root(tmp_path / "f")
    with pytest.raises(CheckpointError, match=r"cannot be created \(.*/f is not a directory\)"):
        check_save_root(tmp_path / "f" / "ckpts")
    if os.geteuid() != 0:  # root writes through permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(CheckpointError, match="not writable"):
            check_save_root(ro)


def test_binary_latest_is_named(tmp_path):
    from longpo_megatron.checkpoint import paths

    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(CheckpointError, match=r"latest: holds binary data"):
        paths.resolve(tmp_path)


def test_full_disk_during_save_is_named(tmp_path, single_rank_group):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    ckpt = tmp_path / "iter_0000001.tmp"
    ckpt.mkdir()
    os.symlink("/dev/full", ckpt / "__0_0.distcp")  # every write: ENOSPC
    sd = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(1024))}
    with pytest.raises(CheckpointError, match=r"saving failed: rank 0: No space left on device"):
        storage.CpuTorchDistSaveStrategy().save(sd, ckpt)
