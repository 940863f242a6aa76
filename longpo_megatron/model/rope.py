"""RoPE that stays on the device of its inputs (megatron's moves ``inv_freq`` to CUDA) and
slices its table for context parallelism with project code (megatron's slice pins CUDA memory).

Frequency scaling (``model.rope_scaling``) reuses megatron-core's own formulas: Llama-3.1's
``llama3`` rescaling is ``RotaryEmbedding._apply_scaling``; YaRN's frequency blend is
``YarnRotaryEmbedding``'s ramp, and its cos/sin attention factor is applied by megatron's
attention from the ``yarn_*`` fields of :class:`~longpo_megatron.model.gpt.LongPOTransformerConfig`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_find_correction_range,
    _yarn_linear_ramp_mask,
)
from torch import Tensor

from longpo_megatron.config import ModelConfig
from longpo_megatron.context_parallel import local_token_index


class DeviceAgnosticRotaryEmbedding(RotaryEmbedding):
    """megatron's ``RotaryEmbedding`` with the CUDA move replaced by a move to the model's device.

    The frequency table is computed in fp32 exactly as megatron does; only the device differs.
    ``scaling`` (a :class:`ModelConfig` whose ``rope_scaling`` is llama3 or yarn) rescales the
    inverse frequencies once, at construction, for the given ``rotary_base``.
    """

    def __init__(self, *args, scaling: Optional[ModelConfig] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if scaling is not None and scaling.rope_scaling != "none":
            self.inv_freq = scaled_inv_freq(self, scaling, kwargs["rotary_base"])

    def get_emb(self, max_seq_len: int, offset: int = 0) -> Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(
                freqs.shape[0], -1
            )
        return emb[:, None, None, :]

    def forward(  # noqa: D102 - megatron's contract; the CP slice is the load-balanced layout
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: Optional[dist.ProcessGroup] = None,
    ) -> Tensor:
        if self.positions is not None:
            return self.row_emb(self.positions)
        emb = self.get_emb(max_seq_len, offset)
        group = cp_group if cp_group is not None else self.cp_group
        if group is not None and group.size() > 1 and not packed_seq:
            index = local_token_index(max_seq_len, group.rank(), group.size(), emb.device)
            emb = emb.index_select(0, index)
        return emb

    positions: Optional[Tensor] = None
    """``[b, s]`` position ids of this rank's tokens when they are not 0..S−1 (packed
    shared-prefix rows, set by :class:`~longpo_megatron.model.gpt.LongPOGPTModel` for one
    forward); None = megatron's contiguous positions."""

    def row_emb(self, positions: Tensor) -> Tensor:
        """``[s, b, 1, dim]`` angles for per-row ``positions`` (megatron's formula, fp32)."""
        seq = positions.to(device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        if self.seq_len_interpolation_factor is not None:
            seq = seq * (1 / self.seq_len_interpolation_factor)
        freqs = seq.t()[..., None] * self.inv_freq  # [s, b, dim/2]
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        return emb[:, :, None, :]

    def to_device(self, device: torch.device) -> None:
        """Place the frequency table where the model runs (call after ``model.to``)."""
        self.inv_freq = self.inv_freq.to(device)


def scaled_inv_freq(rope: RotaryEmbedding, m: ModelConfig, rotary_base: float) -> Tensor:
    """``rope.inv_freq`` rescaled by ``m.rope_scaling`` (llama3 | yarn) with megatron's formulas."""
    inv_freq = rope.inv_freq
    if m.rope_scaling == "llama3":
        return rope._apply_scaling(
            inv_freq,
            factor=m.rope_scaling_factor,
            low_freq_factor=m.rope_low_freq_factor,
            high_freq_factor=m.rope_high_freq_factor,
            original_max_position_embeddings=m.rope_original_max_position_embeddings,
        )
    if m.rope_scaling == "yarn":
        dim = 2 * inv_freq.numel()
        low, high = _yarn_find_correction_range(
            m.yarn_beta_fast, m.yarn_beta_slow, dim, rotary_base,
            m.rope_original_max_position_embeddings,
        )  # fmt: skip
        extrapolate = 1.0 - _yarn_linear_ramp_mask(low, high, dim // 2, device=inv_freq.device)
        interpolated = inv_freq / m.rope_scaling_factor
        return interpolated * (1 - extrapolate) + inv_freq * extrapolate
    raise ValueError(f"model.rope_scaling={m.rope_scaling!r}: not llama3 or yarn")
