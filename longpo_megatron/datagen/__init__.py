"""Self-generated short-to-long preference data (``longpo-datagen``).

Stages, one module each: ``documents`` (read + validate inputs) and ``chunking`` -> ``prompts``
(question writing and parsing) -> ``backends`` (hf / vllm / plug-in generation) -> ``filters``
-> ``grouping`` (multi-turn records, limits) ; ``pipeline`` (shards, resume), ``merge``, ``cli``.
Output: schema-v1 records (docs/data-format.md) that ``longpo_megatron.data`` reads directly.
"""

from longpo_megatron.datagen.config import DatagenConfig, validate_datagen_config

__all__ = ["DatagenConfig", "validate_datagen_config"]
