"""HF ⇄ megatron checkpoint conversion for Llama / Mistral / Qwen2 (see docs/conversion.md).

* :mod:`.arch` -- HF ``config.json`` ⇄ :class:`~longpo_megatron.config.ModelConfig`;
* :mod:`.mapping` -- pure tensor mapping between HF and full megatron state dicts;
* :mod:`.hf_io` -- lazy HF weight reader, streaming sharded-safetensors writer, tokenizer files;
* :mod:`.megatron_io` -- TP=1/PP=1 model in a 1-rank group; I/O via ``longpo_megatron.checkpoint``;
* :mod:`.convert` -- the two conversions; :mod:`.cli` -- their command lines.
"""

from longpo_megatron.export.arch import (
    ArchSpec,
    ConversionError,
    hf_config_from_model,
    model_config_from_hf,
)
from longpo_megatron.export.mapping import (
    hf_to_megatron_state_dict,
    megatron_to_hf_state_dict,
    tensor_maps,
)

__all__ = [
    "ArchSpec",
    "ConversionError",
    "hf_config_from_model",
    "model_config_from_hf",
    "hf_to_megatron_state_dict",
    "megatron_to_hf_state_dict",
    "tensor_maps",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
]


def __getattr__(name: str):  # lazy: importing the package does not import megatron
    if name in ("convert_hf_to_megatron", "convert_megatron_to_hf"):
        from longpo_megatron.export import convert

        return getattr(convert, name)
    raise AttributeError(name)
