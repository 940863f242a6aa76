"""RoPE that stays on the device of its inputs (megatron's moves ``inv_freq`` to CUDA) and
slices its table for context parallelism with project code (megatron's slice pins CUDA memory)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from torch import Tensor

from longpo_megatron.context_parallel import local_token_index


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

    def forward(  # noqa: D102 - megatron's contract; the CP slice is the load-balanced layout
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: Optional[dist.ProcessGroup] = None,
    ) -> Tensor:
        emb = self.get_emb(max_seq_len, offset)
        group = cp_group if cp_group is not None else self.cp_group
        if group is not None and group.size() > 1 and not packed_seq:
            index = local_token_index(max_seq_len, group.rank(), group.size(), emb.device)
            emb = emb.index_select(0, index)
        return emb

    def to_device(self, device: torch.device) -> None:
        """Place the frequency table where the model runs (call after ``model.to``)."""
        self.inv_freq = self.inv_freq.to(device)
