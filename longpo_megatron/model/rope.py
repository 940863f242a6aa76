"""RoPE that stays on the device of its inputs (megatron's moves ``inv_freq`` to CUDA)."""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from torch import Tensor


class DeviceAgnosticRotaryEmbedding(RotaryEmbedding):
    """megatron's ``RotaryEmbedding`` with the CUDA move replaced by a move to the model's device.

    The frequency table is computed in fp32 exactly as megatron does; only the device differs.
    """

    def get_emb(self, max_seq_len: int, offset: int = 0) -> Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(
                freqs.shape[0], -1
            )
        return emb[:, None, None, :]

    def to_device(self, device: torch.device) -> None:
        """Place the frequency table where the model runs (call after ``model.to``)."""
        self.inv_freq = self.inv_freq.to(device)
        self.forward.cache_clear()
