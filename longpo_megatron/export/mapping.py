"""Pure tensor mapping: HF Llama / Mistral / Qwen2 state dict ⇄ FULL megatron-core state dict.

The megatron side is the TP=1 / PP=1 ``GPTModel`` state dict (global layer indices, unsharded):

* ``...linear_qkv.weight|bias`` rows are interleaved per query group: for group g,
  ``[q heads of g (np/ng heads); k_g; v_g]`` (each head ``head_dim`` rows);
* ``...mlp.linear_fc1.weight`` = ``[gate; up]``;
* ``embedding.word_embeddings.weight`` / ``output_layer.weight`` have ``spec.vocab_size`` rows,
  zero-padded past HF's ``hf_vocab_size`` (stripped again on export);
* tied embeddings: no ``output_layer.weight`` and no ``lm_head.weight``.

Every function here is pure (no I/O, no process groups). TP/PP resharding is left to megatron's
``dist_checkpointing``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from longpo_megatron.export.arch import ArchSpec, ConversionError

COPY, QKV, FC1, VOCAB = "copy", "qkv", "fc1", "vocab"
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
"""HF keys that carry no parameters (old checkpoints saved RoPE buffers)."""


@dataclass(frozen=True)
class TensorMap:
    """One megatron tensor and the HF tensors it is made of."""

    megatron: str
    hf: tuple[str, ...]
    kind: str
    """copy | qkv (hf = q, k, v) | fc1 (hf = gate, up) | vocab (row padding)"""


def tensor_maps(spec: ArchSpec) -> list[TensorMap]:
    """The complete mapping for ``spec``, in HF's natural order (embeddings, layers, norm, head)."""
    maps = [TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB)]
    for i in range(spec.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        a = hf + "self_attn."
        norm = (hf + "input_layernorm.weight",)
        maps.append(TensorMap(mg + "input_layernorm.weight", norm, COPY))
        qkv = tuple(a + f"{p}_proj.weight" for p in "qkv")
        maps.append(TensorMap(mg + "self_attention.linear_qkv.weight", qkv, QKV))
        if spec.add_qkv_bias:
            qkv_b = tuple(a + f"{p}_proj.bias" for p in "qkv")
            maps.append(TensorMap(mg + "self_attention.linear_qkv.bias", qkv_b, QKV))
        o_proj = (a + "o_proj.weight",)
        maps.append(TensorMap(mg + "self_attention.linear_proj.weight", o_proj, COPY))
        maps.append(
            TensorMap(
                mg + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",), COPY
            )
        )
        gate_up = (hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight")
        maps.append(TensorMap(mg + "mlp.linear_fc1.weight", gate_up, FC1))
        maps.append(TensorMap(mg + "mlp.linear_fc2.weight", (hf + "mlp.down_proj.weight",), COPY))
    maps.append(TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), COPY))
    if not spec.tie_word_embeddings:
        maps.append(TensorMap("output_layer.weight", ("lm_head.weight",), VOCAB))
    return maps


def hf_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF tensor."""
    h, f, hn = spec.hidden_size, spec.ffn_hidden_size, spec.head_dim
    q, kv = spec.num_attention_heads * hn, spec.num_query_groups * hn
    out: dict[str, tuple[int, ...]] = {}
    for tm in tensor_maps(spec):
        if tm.kind == VOCAB:
            out[tm.hf[0]] = (spec.hf_vocab_size, h)
        elif tm.kind == QKV:
            rows = (q, kv, kv)
            bias = tm.megatron.endswith("bias")
            for name, r in zip(tm.hf, rows):
                out[name] = (r,) if bias else (r, h)
        elif tm.kind == FC1:
            out[tm.hf[0]] = out[tm.hf[1]] = (f, h)
        elif tm.megatron.endswith("linear_proj.weight"):
            out[tm.hf[0]] = (h, q)
        elif tm.megatron.endswith("linear_fc2.weight"):
            out[tm.hf[0]] = (h, f)
        else:  # norms
            out[tm.hf[0]] = (h,)
    return out


def megatron_shapes(spec: ArchSpec) -> dict[str, tuple[int, ...]]:
    """Expected shape of every tensor of the full megatron state dict."""
    hf = hf_shapes(spec)
    out: dict[str, tuple[int, ...]] = {}
    for tm in tensor_maps(spec):
        first = hf[tm.hf[0]]
        if tm.kind == VOCAB:
            out[tm.megatron] = (spec.vocab_size, *first[1:])
        elif tm.kind in (QKV, FC1):
            rows = sum(hf[n][0] for n in tm.hf)
            out[tm.megatron] = (rows, *first[1:])
        else:
            out[tm.megatron] = first
    return out


def merge_qkv(q: Tensor, k: Tensor, v: Tensor, spec: ArchSpec) -> Tensor:
    """HF (q, k, v) -> megatron rows interleaved per query group (weights or biases)."""
    ng, hn = spec.num_query_groups, spec.head_dim
    per = spec.num_attention_heads // ng
    rest = q.shape[1:]
    qg = q.reshape(ng, per * hn, *rest)
    kg = k.reshape(ng, hn, *rest)
    vg = v.reshape(ng, hn, *rest)
    return torch.cat((qg, kg, vg), dim=1).reshape(ng * (per + 2) * hn, *rest)


def split_qkv(t: Tensor, spec: ArchSpec) -> tuple[Tensor, Tensor, Tensor]:
    """Megatron interleaved QKV rows -> contiguous HF (q, k, v)."""
    ng, hn = spec.num_query_groups, spec.head_dim
    per = spec.num_attention_heads // ng
    rest = t.shape[1:]
    g = t.reshape(ng, (per + 2) * hn, *rest)
    q = g[:, : per * hn].reshape(ng * per * hn, *rest).contiguous()
    k = g[:, per * hn : (per + 1) * hn].reshape(ng * hn, *rest).contiguous()
    v = g[:, (per + 1) * hn :].reshape(ng * hn, *rest).contiguous()
    return q, k, v


def to_megatron(tm: TensorMap, hf_tensors: Sequence[Tensor], spec: ArchSpec) -> Tensor:
    """The megatron tensor of ``tm`` from its HF tensors (in ``tm.hf`` order)."""
    if tm.kind == QKV:
        return merge_qkv(*hf_tensors, spec)
    if tm.kind == FC1:
        return torch.cat(tuple(hf_tensors), dim=0)
    (t,) = hf_tensors
    if tm.kind == VOCAB and spec.vocab_size > t.shape[0]:
        pad = t.new_zeros((spec.vocab_size - t.shape[0], *t.shape[1:]))
        return torch.cat((t, pad), dim=0)
    return t


def to_hf(tm: TensorMap, t: Tensor, spec: ArchSpec) -> tuple[Tensor, ...]:
    """The HF tensors of ``tm`` (in ``tm.hf`` order) from its megatron tensor."""
    if tm.kind == QKV:
        return split_qkv(t, spec)
    if tm.kind == FC1:
        f = spec.ffn_hidden_size
        return t[:f].contiguous(), t[f:].contiguous()
    if tm.kind == VOCAB:
        return (t[: spec.hf_vocab_size].contiguous(),)
    return (t.contiguous(),)


def check_shape(name: str, t: Tensor, want: tuple[int, ...], where: str) -> None:
    """Raise :class:`ConversionError` naming the tensor and its file when a shape is wrong."""
    if tuple(t.shape) != tuple(want):
        raise ConversionError(
            f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(want)} "
            "from the model config"
        )


def hf_to_megatron_state_dict(hf_sd: Mapping[str, Tensor], spec: ArchSpec) -> dict[str, Tensor]:
    """Full HF state dict -> full megatron state dict (strict: unknown HF keys raise)."""
    check_hf_keys(hf_sd.keys(), spec, "state dict")
    shapes = hf_shapes(spec)
    out = {}
    for tm in tensor_maps(spec):
        parts = []
        for n in tm.hf:
            check_shape(n, hf_sd[n], shapes[n], "state dict")
            parts.append(hf_sd[n])
        out[tm.megatron] = to_megatron(tm, parts, spec)
    return out


def megatron_to_hf_state_dict(
    get: Mapping[str, Tensor] | Callable[[str], Tensor], spec: ArchSpec
) -> dict[str, Tensor]:
    """Full megatron state dict (or a getter by name) -> full HF state dict."""
    fetch = get if callable(get) else get.__getitem__
    shapes = megatron_shapes(spec)
    out = {}
    for tm in tensor_maps(spec):
        t = fetch(tm.megatron)
        check_shape(tm.megatron, t, shapes[tm.megatron], "megatron state dict")
        out.update(zip(tm.hf, to_hf(tm, t, spec)))
    return out


def check_hf_keys(keys, spec: ArchSpec, where: str) -> None:
    """Every expected HF tensor present; no unexpected one (tied ``lm_head.weight`` tolerated)."""
    have = {k for k in keys if not k.endswith(IGNORED_HF_SUFFIXES)}
    want = set(hf_shapes(spec))
    if spec.tie_word_embeddings:
        have.discard("lm_head.weight")
    missing, extra = sorted(want - have), sorted(have - want)
    if missing:
        raise ConversionError(f"{where}: missing tensor(s) {_few(missing)} for the model config")
    if extra:
        raise ConversionError(
            f"{where}: unexpected tensor(s) {_few(extra)} (not part of a {spec.family} model "
            f"with {spec.num_layers} layers)"
        )


def _few(names: list[str], n: int = 6) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")
