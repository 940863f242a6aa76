"""HF ⇄ megatron conversion on tiny random Llama (GQA, untied, head_dim ≠ h/heads), Mistral and
Qwen2 (QKV bias, tied) models made here from transformers configs (fp32, eager attention).

Proofs: HF -> megatron logits equal HF logits (≤ 1e-5 relative) at TP=1 and TP=2; the checkpoint
loads at PP=2 with the same weights; megatron -> HF -> megatron is bitwise; a TP=2 checkpoint
exports bitwise like the TP=1 one; exported directories load in ``transformers`` with the same
logits; shards and index are well-formed and respect the size limit; bad input fails clearly.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from dist_harness import init_gloo, run_distributed
from parity_common import rel_err

transformers = pytest.importorskip("transformers")

from longpo_megatron.checkpoint import CheckpointError  # noqa: E402
from longpo_megatron.export import megatron_io as mio  # noqa: E402
from longpo_megatron.export.arch import (  # noqa: E402
    ArchSpec,
    ConversionError,
    hf_config_from_model,
    model_config_from_hf,
)
from longpo_megatron.export.cli import hf_to_megatron_main, megatron_to_hf_main  # noqa: E402
from longpo_megatron.export.convert import (  # noqa: E402
    convert_hf_to_megatron,
    convert_megatron_to_hf,
)
from longpo_megatron.export.mapping import (  # noqa: E402
    hf_to_megatron_state_dict,
    megatron_to_hf_state_dict,
)

V, H, FFN, L = 96, 64, 96, 2
FAMILIES = ("llama", "mistral", "qwen2")
TOL = 1e-5


def hf_config(family: str):
    """Tiny transformers config of ``family`` (TP=2-compatible: 2 KV heads, even vocab)."""
    common = dict(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FFN,
        num_hidden_layers=L,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        num_key_value_heads=2,
        bos_token_id=V - 2,
        eos_token_id=V - 1,
    )
    if family == "llama":  # GQA 8:2, untied, head_dim 16 != 64 / 8
        return transformers.LlamaConfig(
            num_attention_heads=8, head_dim=16, rope_theta=10000.0, **common
        )
    if family == "mistral":
        return transformers.MistralConfig(
            num_attention_heads=4, rope_theta=50000.0, sliding_window=None, **common
        )
    return transformers.Qwen2Config(  # QKV bias, tied embeddings
        num_attention_heads=4, rope_theta=1e6, tie_word_embeddings=True, **common
    )


def make_hf_model(family: str, seed: int = 1234):
    """Random fp32 eager model whose every weight (norms, biases) matters."""
    cfg = hf_config(family)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model = model.float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if name.endswith("norm.weight") else 0.15
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + scale * torch.randn_like(p))
    return model


def save_tokenizer(path: Path) -> None:
    """A tiny word-level fast tokenizer (tokenizer.json + config + special tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(V - 3)}
    vocab.update({"<unk>": V - 3, "<s>": V - 2, "</s>": V - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(path)


def theta_of(hf: dict) -> float:
    """RoPE θ of an HF config dict: top level before transformers 5, in rope_parameters after."""
    return hf["rope_theta"] if "rope_theta" in hf else hf["rope_parameters"]["rope_theta"]


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


TOKENS = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Per family: HF dir (sharded), megatron root converted from it, HF reference logits."""
    base = tmp_path_factory.mktemp("convert")
    out = {}
    for family in FAMILIES:
        model = make_hf_model(family)
        hf_dir = base / f"{family}_hf"
        model.save_pretrained(hf_dir, max_shard_size="60KB")  # several shards + index
        save_tokenizer(hf_dir)
        root = base / f"{family}_mg"
        convert_hf_to_megatron(hf_dir, root, progress=False)
        out[family] = dict(
            hf_dir=hf_dir, root=root, logits=hf_logits(model, TOKENS), state=model.state_dict()
        )
    return out


# --------------------------------------------------------------------------------------------
# Pure mapping and configs (no processes)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_mapping_matches_reference_impl_and_inverts(family):
    from reference_impl import RefConfig, from_megatron_state_dict

    model = make_hf_model(family)
    m = model_config_from_hf(model.config.to_dict())
    spec = ArchSpec.from_model_config(m)
    full = hf_to_megatron_state_dict(model.state_dict(), spec)
    ref_cfg = RefConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        vocab_size=m.vocab_size,
        rotary_base=m.rotary_base,
        norm_epsilon=m.norm_epsilon,
        add_qkv_bias=m.add_qkv_bias,
        tie_word_embeddings=m.tie_word_embeddings,
    )
    ref = from_megatron_state_dict(full, ref_cfg)
    with torch.no_grad():
        assert rel_err(ref(TOKENS), hf_logits(model, TOKENS)) <= TOL
    back = megatron_to_hf_state_dict(full, spec)
    sd = {k: v for k, v in model.state_dict().items() if k in back}
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_roundtrip_loads_in_transformers(family):
    hf = hf_config(family).to_dict()
    m = model_config_from_hf(hf, rotary_base=1e7)
    assert m.reference_rotary_base == theta_of(hf) and m.rotary_base == 1e7
    assert m.add_qkv_bias == (family == "qwen2") and m.tie_word_embeddings == (family == "qwen2")
    out = hf_config_from_model(m, template=hf)
    assert out["rope_theta"] == 1e7 and out["bos_token_id"] == V - 2
    kw = {k: v for k, v in out.items() if k != "model_type"}
    cfg = transformers.AutoConfig.for_model(out["model_type"], **kw)
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 16
    back = model_config_from_hf(out)
    assert back.rotary_base == 1e7 and back.num_layers == L and back.kv_channels == m.kv_channels


def test_unsupported_configs_are_named():
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}
    with pytest.raises(ConversionError, match="GPT2LMHeadModel"):
        model_config_from_hf(gpt2)
    llama = hf_config("llama").to_dict()
    with pytest.raises(ConversionError, match="attention_bias"):
        model_config_from_hf({**llama, "attention_bias": True})
    dynamic = {"rope_type": "dynamic", "factor": 8.0}
    if "rope_parameters" in llama:  # transformers >= 5 reads the scaling from there
        scaled = {**llama, "rope_parameters": {**llama["rope_parameters"], **dynamic}}
    else:
        scaled = {**llama, "rope_scaling": dynamic}
    with pytest.raises(ConversionError, match="rope_type='dynamic' is not modelled"):
        model_config_from_hf(scaled, allow_unmodelled=True)  # never converted as plain RoPE
    windowed = {**hf_config("mistral").to_dict(), "sliding_window": 64}
    with pytest.raises(ConversionError, match="sliding_window.*--allow-unmodelled"):
        model_config_from_hf(windowed)
    assert model_config_from_hf(windowed, allow_unmodelled=True).family == "mistral"


# --------------------------------------------------------------------------------------------
# Distributed: load the converted checkpoints at TP=2, TP=1 (DP=2) and PP=2
# --------------------------------------------------------------------------------------------
def _logits_tp(model, groups, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocab logits [B, S, V] of a PP=1 model (vocab-parallel output gathered over TP)."""
    import torch.distributed as dist

    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        hidden = model(tokens, pos, None)  # [S, B, h]
        local = hidden @ model.output_weight().T
    parts = [torch.empty_like(local) for _ in range(groups.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=groups.tp)
    return torch.cat(parts, dim=-1).transpose(0, 1)


def _dist_worker(rank: int, world: int, cases: dict, tokens: torch.Tensor, tp2_roots: dict):
    from gather import gather_full_state
    from megatron.core import parallel_state

    from longpo_megatron import checkpoint, distributed
    from longpo_megatron.export.arch import model_config_from_dict
    from longpo_megatron.model.gpt import ModelLayout, build_model

    init_gloo()
    out: dict = {}
    for tp, pp in ((2, 1), (1, 1), (1, 2)):
        groups = distributed.init_model_parallel(tp, pp, 1)
        layout = ModelLayout(tp, pp, 1, False, "local", "cpu", "fp32")
        for family, root in cases.items():
            ckpt = mio.resolve_checkpoint(root)
            m = model_config_from_dict(mio.read_common(ckpt)["model_config"])
            if pp > 1 and m.tie_word_embeddings:
                continue  # tied embeddings need PP=1 (config_validation refuses them)
            torch.manual_seed(99)  # random init, then overwritten by the checkpoint
            model = build_model(m, layout, groups).eval()
            checkpoint.load(ckpt, model, groups)  # the training path
            if pp == 1:
                out[(family, tp)] = _logits_tp(model, groups, tokens)
            else:
                full = gather_full_state(model, groups, num_layers=m.num_layers)
                out[(family, "pp2")] = full
            if tp == 2:
                common = mio.read_common(ckpt)
                meta = {k: common[k] for k in ("model_config", "hf")}
                mio.save_weights_checkpoint(model, tp2_roots[family], meta, groups)
        parallel_state.destroy_model_parallel()
    return out if rank == 0 else None


@pytest.fixture(scope="module")
def distributed_results(converted, tmp_path_factory):
    base = tmp_path_factory.mktemp("tp2")
    cases = {f: str(c["root"]) for f, c in converted.items()}
    tp2_roots = {f: str(base / f) for f in FAMILIES}
    (res, _) = run_distributed(
        _dist_worker, 2, timeout_s=240, cases=cases, tokens=TOKENS, tp2_roots=tp2_roots
    )
    return res, {f: Path(p) for f, p in tp2_roots.items()}


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tp", (1, 2))
def test_megatron_logits_equal_hf(converted, distributed_results, family, tp):
    res, _ = distributed_results
    err = rel_err(res[(family, tp)], converted[family]["logits"])
    assert err <= TOL, f"{family} TP={tp}: relative logits error {err:.2e}"


@pytest.mark.distributed
@pytest.mark.parametrize("family", ("llama", "mistral"))
def test_checkpoint_loads_at_pp2_with_same_weights(converted, distributed_results, family):
    res, _ = distributed_results
    spec = ArchSpec.from_model_config(model_config_from_hf(hf_config(family).to_dict()))
    want = hf_to_megatron_state_dict(converted[family]["state"], spec)
    got = res[(family, "pp2")]
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


# --------------------------------------------------------------------------------------------
# Export: megatron -> HF
# --------------------------------------------------------------------------------------------
def _hf_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.distributed
@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_checkpoint_exports_like_tp1(converted, distributed_results, family, tmp_path):
    _, tp2_roots = distributed_results
    root = converted[family]["root"]
    convert_megatron_to_hf(root, tmp_path / "tp1", progress=False)
    convert_megatron_to_hf(
        tp2_roots[family], tmp_path / "tp2", template_dir=root / "hf", progress=False
    )
    one, two = _hf_files(tmp_path / "tp1"), _hf_files(tmp_path / "tp2")
    assert one.keys() == two.keys() and one == two


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_with_same_logits(converted, family, tmp_path):
    c = converted[family]
    out = convert_megatron_to_hf(c["root"], tmp_path / "hf", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in c["state"].items())
    assert rel_err(hf_logits(model.float().eval(), TOKENS), c["logits"]) <= TOL
    # the class the template was saved with: transformers 5's AutoTokenizer would pick one by
    # model_type (Qwen2Tokenizer), which rebuilds this toy word-level vocabulary as BPE
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    assert tok("w1 w2")["input_ids"] == [1, 2] and tok.eos_token == "</s>"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == theta_of(hf_config(family).to_dict())
    assert (out / "generation_config.json").is_file()


def _megatron_tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every stored ``model.*`` tensor of a checkpoint, read without a model."""
    from longpo_megatron import checkpoint

    return checkpoint.read_tensors(checkpoint.resolve(root), prefix="model.")


@pytest.mark.parametrize("family", ("llama", "qwen2"))
def test_megatron_hf_megatron_is_bitwise(family, tmp_path):
    """A random megatron model (not made from HF) -> HF -> megatron: every tensor identical."""
    from longpo_megatron.export.arch import model_config_to_dict

    m = model_config_from_hf(hf_config(family).to_dict(), rotary_base=1e7)
    with mio.single_rank_groups() as groups:
        model = mio.build_tp1_model(m, torch.float32, groups)
        torch.manual_seed(3)
        with torch.no_grad():  # built uninitialised: give every tensor (norms, biases) values
            for p in mio.model_tensors(model).values():
                p.copy_(0.1 * torch.randn_like(p))
        meta = {"model_config": model_config_to_dict(m)}
        mio.save_weights_checkpoint(model, tmp_path / "a", meta, groups)
    convert_megatron_to_hf(tmp_path / "a", tmp_path / "hf", progress=False)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_theta"] == 1e7
    convert_hf_to_megatron(tmp_path / "hf", tmp_path / "b", progress=False)
    a, b = _megatron_tensors(tmp_path / "a"), _megatron_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _read_header(path: Path) -> tuple[dict, int, int]:
    """(header, header length, data length) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), n, len(raw) - 8 - n


def test_shards_and_index_are_well_formed(converted, tmp_path):
    from safetensors import safe_open

    limit = 40_000
    out = convert_megatron_to_hf(
        converted["llama"]["root"], tmp_path / "hf", max_shard_bytes=limit, progress=False
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 3 and sorted(set(index["weight_map"].values())) == files
    assert set(index["weight_map"]) == set(converted["llama"]["state"])
    total = 0
    for name in files:
        header, n, data_len = _read_header(out / name)
        assert header.pop("__metadata__") == {"format": "pt"} and (8 + n) % 8 == 0
        sizes = [e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()]
        assert data_len == sum(sizes)
        assert data_len <= limit or len(header) == 1, f"{name}: {data_len} bytes > {limit}"
        total += data_len
        with safe_open(str(out / name), framework="pt") as f:
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == name}
    assert index["metadata"]["total_size"] == total


def test_hf_to_megatron_pads_vocab_and_export_strips_it(converted, tmp_path):
    c = converted["mistral"]
    convert_hf_to_megatron(c["hf_dir"], tmp_path / "mg", pad_vocab_multiple=64, progress=False)
    t = _megatron_tensors(tmp_path / "mg")
    emb = t["model.embedding.word_embeddings.weight"]
    assert emb.shape[0] == 128 and torch.count_nonzero(emb[V:]) == 0
    out = convert_megatron_to_hf(tmp_path / "mg", tmp_path / "hf", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == V
    assert all(torch.equal(model.state_dict()[k], v) for k, v in c["state"].items())


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_bad_inputs_fail_clearly(converted, tmp_path, capsys):
    with pytest.raises(ConversionError, match="does not exist"):
        convert_hf_to_megatron(tmp_path / "nope", tmp_path / "o1", progress=False)
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(SystemExit, match="^2$"):
        hf_to_megatron_main([str(bad), str(tmp_path / "o2"), "--no-progress"])
    assert "GPT2LMHeadModel" in capsys.readouterr().err
    # config promises a wider MLP than the weights have: name the file and the tensor
    src = converted["llama"]["hf_dir"]
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for p in src.iterdir():
        os.symlink(p, wrong / p.name)
    cfg = json.loads((src / "config.json").read_text())
    (wrong / "config.json").unlink()
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": FFN + 2}))
    with pytest.raises(ConversionError, match=r"model-\d+-of-\d+\.safetensors.*gate_proj"):
        convert_hf_to_megatron(wrong, tmp_path / "o3", progress=False)
    with pytest.raises(SystemExit, match="^2$"):
        megatron_to_hf_main([str(tmp_path / "nope"), str(tmp_path / "o4")])
    assert "does not exist" in capsys.readouterr().err


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/longpo_convert_pwned",))


def test_no_arbitrary_pickles(converted, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((converted["llama"]["hf_dir"] / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": _Evil()}, evil / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="weights_only"):
        convert_hf_to_megatron(evil, tmp_path / "o", progress=False)
    ckpt = mio.resolve_checkpoint(converted["llama"]["root"])
    poisoned = tmp_path / "iter_0000000"
    poisoned.mkdir()
    for p in ckpt.iterdir():
        os.symlink(p, poisoned / p.name)
    (poisoned / ".metadata").unlink()
    (poisoned / ".metadata").write_bytes(pickle.dumps(_Evil()))
    (poisoned / "checksums.json").unlink()  # the unpickler holds without the manifest too
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        convert_megatron_to_hf(poisoned, tmp_path / "hf", template_dir=converted["llama"]["hf_dir"])
    assert not Path("/tmp/longpo_convert_pwned").exists()


def test_cli_scripts_roundtrip_bf16(tmp_path):
    """The tool scripts end to end on a bf16 model: HF -> megatron -> HF is bitwise."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    model = make_hf_model("mistral").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    tools = Path(__file__).resolve().parents[1] / "tools"
    calls = (
        ("convert_hf_to_megatron.py", "hf", "mg", "--no-progress"),
        ("convert_megatron_to_hf.py", "mg/latest", "out", "--max-shard-size", "50KB"),
    )
    for script, src, dst, *flags in calls:
        cmd = [sys.executable, str(tools / script), str(tmp_path / src), str(tmp_path / dst)]
        proc = subprocess.run(cmd + flags, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "write" in proc.stderr  # the HF writer's tqdm bar
    out = tmp_path / "out"
    got: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        got.update(load_file(f))
    want = model.state_dict()
    assert got.keys() == want.keys()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
