"""Independent single-process reference for LongPO training, in plain PyTorch.

This module deliberately shares NO code with ``longpo_megatron`` (and does not import megatron):
distributed tests compare the package against it, so it must be derivable from first principles
and from the documented layouts alone.

Contents:

* :class:`RefConfig` / :class:`RefLlama` -- a Llama-family decoder (RMSNorm, RoPE in HF
  ``rotate_half`` style, GQA attention written out as matmul + masked softmax, SwiGLU MLP).
* :func:`from_megatron_state_dict` / :func:`to_megatron_state_dict` / :func:`grads_to_megatron`
  -- conversion between the reference and a FULL megatron-core ``GPTModel`` state dict
  (TP-gathered, PP-merged, global layer indices).
* :func:`pair_terms` / :func:`longpo_reference_loss` -- the LongPO objective over one global batch
  given as a list of micro-batches (the ``collate_pairs`` contract of ``docs/design.md``).
* :func:`reference_lr` / :func:`reference_train` -- AdamW + warmup/cosine LR + grad clipping.
* :func:`ref_short_logps` -- reference scores of short sequences.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RefConfig",
    "RefLlama",
    "from_megatron_state_dict",
    "to_megatron_state_dict",
    "grads_to_megatron",
    "sequence_logps",
    "pair_terms",
    "longpo_reference_loss",
    "reference_lr",
    "reference_train",
    "ref_short_logps",
    "PREFERENCE_LOSSES",
]

PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge")


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------
@dataclass
class RefConfig:
    """Architecture of the reference decoder (names follow megatron's TransformerConfig)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int | None
    vocab_size: int
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    add_qkv_bias: bool = False
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        """Per-head width ``hn`` (``kv_channels`` or ``hidden_size // num_attention_heads``)."""
        if self.kv_channels is not None:
            return int(self.kv_channels)
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ValueError("num_attention_heads must be a multiple of num_query_groups")
        if self.head_dim % 2 != 0:
            raise ValueError("head dim must be even for RoPE")


class RefRMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * w``, computed in at least float32."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """Normalize over the last dimension."""
        dtype = x.dtype
        xf = x.to(torch.promote_types(dtype, torch.float32))
        var = xf.pow(2).mean(dim=-1, keepdim=True)
        xf = xf * torch.rsqrt(var + self.eps)
        return self.weight * xf.to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_cos_sin(
    position_ids: Tensor, dim: int, base: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos/sin tables [B, S, dim] for non-interleaved (HF Llama) RoPE."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).double() / dim))
    freqs = position_ids.double()[..., None] * inv_freq.to(position_ids.device)  # [B, S, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RefAttention(nn.Module):
    """Causal GQA self-attention with separate q/k/v projections (HF layout)."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        h, hn = cfg.hidden_size, cfg.head_dim
        self.np = cfg.num_attention_heads
        self.ng = cfg.num_query_groups
        self.hn = hn
        self.base = cfg.rotary_base
        self.q_proj = nn.Linear(h, self.np * hn, bias=cfg.add_qkv_bias)
        self.k_proj = nn.Linear(h, self.ng * hn, bias=cfg.add_qkv_bias)
        self.v_proj = nn.Linear(h, self.ng * hn, bias=cfg.add_qkv_bias)
        self.o_proj = nn.Linear(self.np * hn, h, bias=False)

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
        """x: [B, S, h]; position_ids: [B, S]."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.np, self.hn).transpose(1, 2)  # [B, np, S, hn]
        k = self.k_proj(x).view(b, s, self.ng, self.hn).transpose(1, 2)  # [B, ng, S, hn]
        v = self.v_proj(x).view(b, s, self.ng, self.hn).transpose(1, 2)
        cos, sin = _rope_cos_sin(position_ids, self.hn, self.base, q.dtype)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # GQA: query head j reads kv group j // (np / ng).
        group_of_head = torch.arange(self.np, device=x.device) // (self.np // self.ng)
        k = k[:, group_of_head]
        v = v[:, group_of_head]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.hn)  # [B, np, S, S]
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
        ctx = torch.matmul(probs.to(v.dtype), v)  # [B, np, S, hn]
        ctx = ctx.transpose(1, 2).reshape(b, s, self.np * self.hn)
        return self.o_proj(ctx)


class RefMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the gated MLP."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RefLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.input_layernorm = RefRMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.self_attn = RefAttention(cfg)
        self.post_attention_layernorm = RefRMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.mlp = RefMLP(cfg)

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
        """Residual attention then residual MLP."""
        x = x + self.self_attn(self.input_layernorm(x), position_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class RefLlama(nn.Module):
    """Llama-family causal LM: embedding, L pre-norm blocks, final RMSNorm, LM head."""

    def __init__(self, cfg: RefConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(RefLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RefRMSNorm(cfg.hidden_size, cfg.norm_epsilon)
        self.lm_head: nn.Linear | None = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def output_weight(self) -> Tensor:
        """The [V, h] output projection (the embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, tokens: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """tokens [B, S] -> logits [B, S, V]; positions default to 0..S-1."""
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, position_ids)
        x = self.norm(x)
        return F.linear(x, self.output_weight())


# --------------------------------------------------------------------------------------------
# Megatron layout conversion
# --------------------------------------------------------------------------------------------
def _split_qkv(t: Tensor, cfg: RefConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Megatron fused qkv rows (per group: q heads, k, v) -> HF (q, k, v); works for W and b."""
    np_, ng, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    per = np_ // ng
    rest = t.shape[1:]
    g = t.reshape(ng, (per + 2) * hn, *rest)
    q = g[:, : per * hn].reshape(np_ * hn, *rest)
    k = g[:, per * hn : (per + 1) * hn].reshape(ng * hn, *rest)
    v = g[:, (per + 1) * hn :].reshape(ng * hn, *rest)
    return q, k, v


def _merge_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: RefConfig) -> Tensor:
    """HF (q, k, v) -> megatron fused qkv rows (per group: q heads, k, v)."""
    np_, ng, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.head_dim
    per = np_ // ng
    rest = q.shape[1:]
    qg = q.reshape(ng, per * hn, *rest)
    kg = k.reshape(ng, hn, *rest)
    vg = v.reshape(ng, hn, *rest)
    return torch.cat((qg, kg, vg), dim=1).reshape(ng * (per + 2) * hn, *rest)


def _to_megatron(
    model: RefLlama, cfg: RefConfig, get: Callable[[Tensor], Tensor | None]
) -> dict[str, Tensor]:
    """Map ``get(param)`` for every parameter of ``model`` to megatron names/layouts."""

    def val(p: Tensor) -> Tensor:
        t = get(p)
        return torch.zeros_like(p) if t is None else t.detach().clone()

    out: dict[str, Tensor] = {"embedding.word_embeddings.weight": val(model.embed_tokens.weight)}
    for i, layer in enumerate(model.layers):
        pre = f"decoder.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        out[pre + "input_layernorm.weight"] = val(layer.input_layernorm.weight)
        out[pre + "self_attention.linear_qkv.weight"] = _merge_qkv(
            val(attn.q_proj.weight), val(attn.k_proj.weight), val(attn.v_proj.weight), cfg
        )
        if cfg.add_qkv_bias:
            out[pre + "self_attention.linear_qkv.bias"] = _merge_qkv(
                val(attn.q_proj.bias), val(attn.k_proj.bias), val(attn.v_proj.bias), cfg
            )
        out[pre + "self_attention.linear_proj.weight"] = val(attn.o_proj.weight)
        out[pre + "pre_mlp_layernorm.weight"] = val(layer.post_attention_layernorm.weight)
        out[pre + "mlp.linear_fc1.weight"] = torch.cat(
            (val(mlp.gate_proj.weight), val(mlp.up_proj.weight)), dim=0
        )
        out[pre + "mlp.linear_fc2.weight"] = val(mlp.down_proj.weight)
    out["decoder.final_layernorm.weight"] = val(model.norm.weight)
    if model.lm_head is not None:
        out["output_layer.weight"] = val(model.lm_head.weight)
    return out


def to_megatron_state_dict(model: RefLlama, cfg: RefConfig | None = None) -> dict[str, Tensor]:
    """The reference parameters as a FULL megatron-core GPTModel state dict."""
    return _to_megatron(model, cfg or model.cfg, lambda p: p)


def grads_to_megatron(model: RefLlama, cfg: RefConfig | None = None) -> dict[str, Tensor]:
    """The reference ``.grad`` values under megatron names/layouts (zeros where grad is None)."""
    return _to_megatron(model, cfg or model.cfg, lambda p: p.grad)


def from_megatron_state_dict(
    full_sd: Mapping[str, Tensor], cfg: RefConfig, *, strict: bool = True
) -> RefLlama:
    """Build a :class:`RefLlama` from a FULL megatron-core GPTModel state dict.

    ``full_sd`` must be TP-gathered and PP-merged with global layer indices. Non-parameter
    entries (``*._extra_state``, rotary buffers) are ignored. With ``strict``, any other
    unrecognised key or missing parameter raises ``KeyError``. The returned model takes the
    dtype of the state dict's embedding.
    """
    dtype = full_sd["embedding.word_embeddings.weight"].dtype
    model = RefLlama(cfg).to(dtype)
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in full_sd:
            raise KeyError(f"missing {name!r} in megatron state dict")
        used.add(name)
        return full_sd[name].detach()

    def put(param: Tensor, value: Tensor, name: str) -> None:
        if tuple(param.shape) != tuple(value.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value)

    name = "embedding.word_embeddings.weight"
    put(model.embed_tokens.weight, take(name), name)
    for i, layer in enumerate(model.layers):
        pre = f"decoder.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        put(layer.input_layernorm.weight, take(pre + "input_layernorm.weight"), pre)
        q, k, v = _split_qkv(take(pre + "self_attention.linear_qkv.weight"), cfg)
        put(attn.q_proj.weight, q, pre + "q")
        put(attn.k_proj.weight, k, pre + "k")
        put(attn.v_proj.weight, v, pre + "v")
        if cfg.add_qkv_bias:
            qb, kb, vb = _split_qkv(take(pre + "self_attention.linear_qkv.bias"), cfg)
            put(attn.q_proj.bias, qb, pre + "q bias")
            put(attn.k_proj.bias, kb, pre + "k bias")
            put(attn.v_proj.bias, vb, pre + "v bias")
        put(attn.o_proj.weight, take(pre + "self_attention.linear_proj.weight"), pre + "proj")
        put(
            layer.post_attention_layernorm.weight,
            take(pre + "pre_mlp_layernorm.weight"),
            pre + "pre_mlp_layernorm",
        )
        fc1 = take(pre + "mlp.linear_fc1.weight")
        f = cfg.ffn_hidden_size
        if fc1.shape[0] != 2 * f:
            raise ValueError(f"{pre}mlp.linear_fc1.weight has {fc1.shape[0]} rows, want {2 * f}")
        put(mlp.gate_proj.weight, fc1[:f], pre + "gate")
        put(mlp.up_proj.weight, fc1[f:], pre + "up")
        put(mlp.down_proj.weight, take(pre + "mlp.linear_fc2.weight"), pre + "fc2")
    put(model.norm.weight, take("decoder.final_layernorm.weight"), "final_layernorm")
    if model.lm_head is not None:
        put(model.lm_head.weight, take("output_layer.weight"), "output_layer")
    elif "output_layer.weight" in full_sd:
        used.add("output_layer.weight")  # tied: a duplicated copy may be present; ignore it
    if strict:
        extra = [
            k
            for k in full_sd
            if k not in used and not k.endswith("_extra_state") and "rotary_pos_emb" not in k
        ]
        if extra:
            raise KeyError(f"unexpected keys in megatron state dict: {sorted(extra)}")
    return model


# --------------------------------------------------------------------------------------------
# LongPO objective
# --------------------------------------------------------------------------------------------
def _float_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def sequence_logps(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Per-position log p(labels[:, t] | tokens[:, :t+1]) -> [R, S] (full logits, log-softmax).

    Labels outside ``[0, V)`` (e.g. ``-100`` padding) give 0 there; masks must exclude them.
    """
    tokens = batch["tokens"]
    logits = model(tokens, batch.get("position_ids"))
    logp_all = torch.log_softmax(logits.to(_float_dtype(logits)), dim=-1)
    labels = batch["labels"]
    valid = (labels >= 0) & (labels < logits.shape[-1])
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * valid.to(logp.dtype)


def pair_terms(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    nll: Tensor,
    *,
    beta: float,
    lam: float,
    preference_loss: str = "sigmoid",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair LongPO terms from summed log-probs (all inputs shape [P]).

    Δ = β[(π_c − r_c) − (π_r − r_r)]; pref = −logσ(Δ) | (Δ/β − 1/(2β))² | relu(1 − Δ);
    loss_i = nll_i + λ·pref_i. Returns (per-pair loss [P], dict of per-pair tensors [P]).
    """
    rewards_chosen = beta * (policy_chosen - ref_chosen)
    rewards_rejected = beta * (policy_rejected - ref_rejected)
    delta = rewards_chosen - rewards_rejected
    if preference_loss == "sigmoid":
        pref = -F.logsigmoid(delta)
    elif preference_loss == "ipo":
        pref = (delta / beta - 1.0 / (2.0 * beta)) ** 2
    elif preference_loss == "hinge":
        pref = torch.relu(1.0 - delta)
    else:
        raise ValueError(f"unknown preference_loss {preference_loss!r}; use {PREFERENCE_LOSSES}")
    loss = nll + lam * pref
    terms = {
        "loss": loss,
        "nll": nll,
        "pref_loss": pref,
        "rewards/chosen": rewards_chosen,
        "rewards/rejected": rewards_rejected,
        "rewards/margins": delta,
        "rewards/accuracy": (rewards_chosen > rewards_rejected).to(delta.dtype),
        "logps/policy_chosen": policy_chosen,
        "logps/policy_rejected": policy_rejected,
        "logps/ref_chosen": ref_chosen,
        "logps/ref_rejected": ref_rejected,
    }
    return loss, terms


def _micro_batch_pair_inputs(
    model: nn.Module, mb: Mapping[str, Tensor], nll_scope: str
) -> dict[str, Tensor]:
    """Summed policy log-probs, ref log-probs and chosen-row NLL for one micro-batch."""
    if nll_scope not in ("full", "responses"):
        raise ValueError(f"unknown nll_scope {nll_scope!r}; use 'full' or 'responses'")
    rows = mb["tokens"].shape[0]
    if rows % 2:
        raise ValueError("a micro-batch must hold 2B rows (B chosen then B rejected)")
    b = rows // 2
    logp = sequence_logps(model, mb)
    resp = mb["response_mask"].to(logp.dtype)
    policy = (resp * logp).sum(-1)  # [2B]
    ref = mb["ref_logps"].to(device=logp.device, dtype=logp.dtype)
    m = (mb["real_mask"] if nll_scope == "full" else mb["response_mask"]).to(logp.dtype)[:b]
    nll = (m * -logp[:b]).sum(-1) / m.sum(-1)
    return {
        "policy_chosen": policy[:b],
        "policy_rejected": policy[b:],
        "ref_chosen": ref[:b],
        "ref_rejected": ref[b:],
        "nll": nll,
    }


def longpo_reference_loss(
    model: nn.Module,
    batch: Sequence[Mapping[str, Tensor]] | Mapping[str, Tensor],
    beta: float,
    lam: float,
    nll_scope: str,
    preference_loss: str = "sigmoid",
) -> tuple[Tensor, dict[str, float]]:
    """LongPO loss of one global batch (a list of micro-batches, or a single micro-batch).

    loss = mean over ALL pairs of the global batch of (NLL_i + λ·pref_i). Returns the scalar
    loss (differentiable) and metrics (floats, means over pairs).
    """
    micro_batches = [batch] if isinstance(batch, Mapping) else list(batch)
    parts = [_micro_batch_pair_inputs(model, mb, nll_scope) for mb in micro_batches]
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    per_pair, terms = pair_terms(
        cat["policy_chosen"],
        cat["policy_rejected"],
        cat["ref_chosen"],
        cat["ref_rejected"],
        cat["nll"],
        beta=beta,
        lam=lam,
        preference_loss=preference_loss,
    )
    loss = per_pair.mean()
    metrics = {k: float(v.detach().mean()) for k, v in terms.items()}
    return loss, metrics


@torch.no_grad()
def ref_short_logps(model: nn.Module, short_batch: Mapping[str, Tensor]) -> Tensor:
    """Σ response_mask·logp per row of a short batch -> [R] (reference scores)."""
    logp = sequence_logps(model, short_batch)
    return (short_batch["response_mask"].to(logp.dtype) * logp).sum(-1)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def reference_lr(
    step: int, peak: float, min_lr: float, warmup_fraction: float, train_iters: int
) -> float:
    """LR of the ``step``-th update (0-based): linear warmup then cosine decay to ``min_lr``."""
    warmup_steps = int(warmup_fraction * train_iters)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, train_iters - warmup_steps)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _total_grad_norm(params: Sequence[Tensor]) -> Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch.stack([torch.linalg.vector_norm(g.detach(), 2.0) for g in grads])
    return torch.linalg.vector_norm(norms, 2.0)


def reference_train(
    model: nn.Module,
    global_batches: Sequence[Sequence[Mapping[str, Tensor]]],
    steps: int,
    lr: float,
    min_lr: float,
    warmup_fraction: float,
    train_iters: int,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    clip_grad: float,
    beta: float,
    lam: float,
    nll_scope: str,
    preference_loss: str = "sigmoid",
) -> list[tuple[float, dict[str, float], float]]:
    """Train ``model`` in place for ``steps`` updates; step s uses ``global_batches[s % n]``.

    AdamW with weight decay on params with ndim ≥ 2 only; LR per :func:`reference_lr`; gradient
    clipping as ``torch.nn.utils.clip_grad_norm_`` (``clip_grad == 0`` → none). Returns per step
    (loss, metrics, pre-clip total grad L2 norm); loss/metrics are those of the forward pass
    before the update. On return each parameter's ``.grad`` holds the LAST step's gradient as the
    optimizer used it (i.e. after clipping, which scales in place like megatron's optimizer).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=betas,
        eps=eps,
    )
    history: list[tuple[float, dict[str, float], float]] = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        loss, metrics = longpo_reference_loss(
            model, global_batches[s % len(global_batches)], beta, lam, nll_scope, preference_loss
        )
        loss.backward()
        if clip_grad > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            norm = _total_grad_norm(params)
        cur = reference_lr(s, lr, min_lr, warmup_fraction, train_iters)
        for group in opt.param_groups:
            group["lr"] = cur
        opt.step()
        history.append((float(loss.detach()), metrics, float(norm)))
    return history
