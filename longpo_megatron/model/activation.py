"""SwiGLU as megatron's MLP activation module (the ``MLPSubmodules.activation_func`` seam).

megatron's unfused gated path computes ``silu(gate) * (up + glu_linear_offset)``: the addition
makes a new ``[s, b, ffn]`` tensor even when the offset is 0, and the product saves it for
backward, so every layer holds one ``[tokens, ffn]`` activation more than the model needs
(about 11% of the tiny model's activation memory) and runs one more elementwise pass. This
module computes ``silu(gate) * up`` on the fused fc1 output directly: the same values and
gradients, bit for bit (``x + 0.0`` is exact). megatron uses it when
``TransformerConfig.use_te_activation_func`` is set (the flag names TE, but the seam is
generic: MLP applies the module to the whole fc1 output); the local specs set both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


class SwiGLU(MegatronModule):
    """``silu(gate) * up`` of a ``[..., 2 * ffn]`` input holding ``[gate | up]``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config=config)
        if not config.gated_linear_unit or config.activation_func is not F.silu:
            raise ValueError("SwiGLU: needs gated_linear_unit=True and activation_func=silu")
        if config.glu_linear_offset != 0.0 or config.activation_func_clamp_value is not None:
            raise ValueError("SwiGLU: glu_linear_offset and activation clamping are not used")

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        gate, up = torch.chunk(x, 2, dim=-1)
        return F.silu(gate) * up
