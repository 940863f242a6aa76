"""Tokenized preference pairs plus their reference scores, and the one-call loader."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

from longpo_megatron.data.records import DataError, DataReport, PreferenceRecord, read_records
from longpo_megatron.data.tokenize import TokenizedPair, tokenize_records
from longpo_megatron.data.tokenizer import ChatTokenizer


class PreferenceDataset:
    """Indexable tokenized pairs; optional Σ log π_ref (chosen, rejected) per pair.

    Reference sums are kept in float64 so the scores of long responses lose nothing before the
    loss (the collated tensor is float32).
    """

    def __init__(
        self,
        pairs: Sequence[TokenizedPair],
        records: Optional[Sequence[PreferenceRecord]] = None,
    ) -> None:
        for i, pair in enumerate(pairs):
            if pair.index != i:
                raise ValueError(f"pair at position {i} has index {pair.index}")
        self.pairs = list(pairs)
        self.records = list(records) if records is not None else None
        self._ref = torch.full((len(self.pairs), 2), math.nan, dtype=torch.float64)
        self._ref_tokens: dict[int, torch.Tensor] = {}
        """Per pair: the reference's per-token log-probs of the chosen responses (sft_kl)."""

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> TokenizedPair:
        return self.pairs[index]

    def record_id(self, index: int) -> str:
        """The record id of pair ``index``."""
        return self.pairs[index].record_id

    def pair_fingerprint(self, index: int, view: str) -> str:
        """sha256 of the tokens the reference scores for pair ``index`` (see
        :func:`~longpo_megatron.reference.sequences.fingerprint`)."""
        from longpo_megatron.reference.sequences import fingerprint

        return fingerprint(self[index], view)

    def set_ref_logps(self, index: int, chosen_sum: float, rejected_sum: float) -> None:
        """Store the reference log-prob sums of pair ``index`` (must be finite)."""
        if not (math.isfinite(chosen_sum) and math.isfinite(rejected_sum)):
            raise ValueError(
                f"pair {index}: non-finite reference scores ({chosen_sum}, {rejected_sum})"
            )
        self._ref[index, 0] = float(chosen_sum)
        self._ref[index, 1] = float(rejected_sum)

    def set_ref_token_logps(self, index: int, values: torch.Tensor) -> None:
        """Store the chosen responses' per-token reference log-probs of pair ``index``."""
        pair = self[index]
        want = sum(pair.chosen_response_mask[1:])
        if values.numel() != want:
            raise ValueError(
                f"record {pair.record_id!r}: {values.numel()} reference token "
                f"log-probs for {want} chosen response tokens (the short and long renderings of "
                "the responses tokenize differently)"
            )
        self._ref_tokens[index] = values.detach().to("cpu", torch.float64).clone()

    def ref_token_logps(self, index: int) -> torch.Tensor:
        """Per-token reference log-probs of pair ``index``'s chosen responses."""
        if index not in self._ref_tokens:
            raise KeyError(f"pair {index} has no per-token reference scores yet")
        return self._ref_tokens[index]

    def ref_logps(self, index: int) -> tuple[float, float]:
        """(chosen_sum, rejected_sum) of pair ``index``; an error when not scored yet."""
        chosen, rejected = (float(v) for v in self._ref[index])
        if math.isnan(chosen) or math.isnan(rejected):
            raise KeyError(f"pair {index} has no reference scores yet")
        return chosen, rejected

    def ref_logps_for(self, indices: Sequence[int]) -> list[tuple[float, float]]:
        """Reference sums for a list of pairs (the ``ref_logps`` argument of collate_pairs)."""
        return [self.ref_logps(i) for i in indices]

    @property
    def has_ref_logps(self) -> bool:
        """True when every pair has reference scores."""
        return bool(len(self) > 0 and not torch.isnan(self._ref).any())

    def unscored_indices(self) -> list[int]:
        """Pairs still missing reference scores."""
        return torch.isnan(self._ref).any(dim=1).nonzero().flatten().tolist()

    def ref_state(self) -> torch.Tensor:
        """A copy of the [N, 2] float64 score table (NaN = unscored) for checkpoints."""
        return self._ref.clone()

    def load_ref_state(self, table: torch.Tensor) -> None:
        """Restore scores saved by :meth:`ref_state`."""
        if tuple(table.shape) != (len(self), 2):
            raise ValueError(f"reference table shape {tuple(table.shape)} != ({len(self)}, 2)")
        self._ref = table.detach().to(dtype=torch.float64, device="cpu").clone()


def load_dataset(
    data_cfg: Any, tokenizer: ChatTokenizer, record_policy: str = "error"
) -> tuple[PreferenceDataset, DataReport]:
    """Read, validate and tokenize ``data_cfg.path`` (a :class:`DataConfig`-like object).

    Malformed records follow ``record_policy`` (default: error); over-length records follow
    ``data_cfg.over_length_policy``. An empty result is an error.
    """
    path = Path(str(data_cfg.path))
    records, report = read_records(path, policy=record_policy)
    pairs, report = tokenize_records(
        records,
        tokenizer,
        int(data_cfg.max_seq_length),
        int(data_cfg.max_ref_seq_length),
        policy=str(data_cfg.over_length_policy),
        report=report,
    )
    if not pairs:
        raise DataError(f"no usable records in {str(path)!r}: {report.summary()}")
    kept = {p.record_id for p in pairs}
    return PreferenceDataset(pairs, [r for r in records if r.id in kept]), report
