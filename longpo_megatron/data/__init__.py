"""Data stage: tokenizers, record schema and validation, tokenization, collation, sampling.

Flow: ``read_records`` (JSONL -> validated records) -> ``tokenize_records`` (long policy
sequences + short reference sequences) -> ``PreferenceDataset`` -> ``PairSampler`` picks indices
-> ``collate_pairs`` / ``collate_short`` build the tensors of the micro-batch contract.
Training reads the same pairs from a prepared dataset (``longpo-preprocess``, :mod:`.prepared`),
memory-mapped and pair by pair; a JSONL is prepared once (:func:`.preprocess.prepared_for_run`).
"""

from longpo_megatron.data.collate import collate_pairs, collate_short, padded_length
from longpo_megatron.data.dataset import PreferenceDataset, load_dataset
from longpo_megatron.data.prepared import PreparedDataError, PreparedDataset, open_prepared
from longpo_megatron.data.records import (
    SCHEMA_VERSION,
    DataReport,
    PreferenceRecord,
    RecordError,
    Turn,
    read_records,
    write_records,
)
from longpo_megatron.data.sampler import PairSampler, slice_for_dp
from longpo_megatron.data.tokenize import TokenizedPair, tokenize_record, tokenize_records
from longpo_megatron.data.tokenizer import (
    ByteChatTokenizer,
    ChatTokenizer,
    HFChatTokenizer,
    build_tokenizer,
    render_chat,
)

__all__ = [
    "SCHEMA_VERSION",
    "ByteChatTokenizer",
    "ChatTokenizer",
    "DataReport",
    "HFChatTokenizer",
    "PairSampler",
    "PreferenceDataset",
    "PreferenceRecord",
    "PreparedDataError",
    "PreparedDataset",
    "RecordError",
    "TokenizedPair",
    "Turn",
    "build_tokenizer",
    "collate_pairs",
    "collate_short",
    "load_dataset",
    "open_prepared",
    "padded_length",
    "read_records",
    "render_chat",
    "slice_for_dp",
    "tokenize_record",
    "tokenize_records",
    "write_records",
]
