"""A general, compact attention-mask description (never an [S × S] tensor).

Query q may attend key k iff
    order[k] <= order[q]                          (causal in sequence order)
    and segment[k] == segment[q]                  (packed documents stay apart)
    and (branch[k] == 0 or branch[k] == branch[q]) (branches share the trunk, not each other)
``segment`` and ``branch`` are optional. Branches let chosen and rejected responses attend to one
shared copy of the long prompt without seeing each other. Under context parallelism the keys
cover the whole sequence and ``query_index`` says which global tokens this rank's queries are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import Tensor

_ALL_ROWS = slice(None)


@dataclass
class AttentionMask:
    """Per-token mask metadata for a ``[b, S]`` (global) sequence."""

    order: Tensor
    """[b, S] int64 causal order (usually the position ids)."""
    segment: Optional[Tensor] = None
    """[b, S] int64 segment ids, or None for one segment per row."""
    branch: Optional[Tensor] = None
    """[b, S] int64 branch ids (0 = shared trunk), or None for no branches."""
    query_index: Optional[Tensor] = None
    """[s_q] global indices of the local queries (CP); None means all S tokens."""
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """Layouts derived from this mask (:meth:`derived`); a copy or ``replace`` starts empty."""

    @classmethod
    def causal(cls, batch: int, seq_len: int, device=None) -> AttentionMask:
        """Plain causal mask over ``seq_len`` tokens."""
        order = torch.arange(seq_len, device=device).unsqueeze(0).expand(batch, seq_len)
        return cls(order=order)

    def to(self, device) -> AttentionMask:
        """Copy to ``device``."""
        move = {k: getattr(self, k) for k in ("order", "segment", "branch", "query_index")}
        return replace(self, **{k: v.to(device) for k, v in move.items() if v is not None})

    def with_queries(self, query_index: Tensor) -> AttentionMask:
        """The same mask for a subset of queries (this CP rank's tokens)."""
        return replace(self, query_index=query_index)

    def derived(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()`` once per mask object and ``key``: every layer of a micro-batch gets the
        same mask, so a layout derived from it (branch runs, a flex ``BlockMask``) is built
        once per micro-batch instead of once per layer."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def query_global(self, local: Tensor) -> Tensor:
        """Global token indices of local query positions ``local``."""
        return local if self.query_index is None else self.query_index[local]

    def block_is_empty(self, q_global: Tensor, k_global: Tensor) -> bool:
        """True when no query of the block may see any key of the block: causal skip per
        row, and (with branches) a key block wholly inside one branch that no query is in."""
        ko, qo = self.order[:, k_global], self.order[:, q_global]
        empty = ko.amin(-1) > qo.amax(-1)
        if self.branch is not None:
            kb, qb = self.branch[:, k_global], self.branch[:, q_global]
            lo, hi = kb.amin(-1), kb.amax(-1)
            empty |= (lo > 0) & (lo == hi) & ~(qb == lo.unsqueeze(-1)).any(-1)
        return bool(empty.all())

    def _rule(self, q: Tensor, k: Tensor, rows=_ALL_ROWS) -> Tensor:
        """The mask rule for global query/key indices ``q``/``k`` (broadcast against each
        other and against ``rows`` of the batch, the first index of every id tensor)."""
        ok = self.order[rows, k] <= self.order[rows, q]
        if self.segment is not None:
            ok = ok & (self.segment[rows, k] == self.segment[rows, q])
        if self.branch is not None:
            kb = self.branch[rows, k]
            ok = ok & ((kb == 0) | (kb == self.branch[rows, q]))
        return ok

    def allowed(self, q_global: Tensor, k_global: Tensor) -> Tensor:
        """[b, 1, len(q), len(k)] bool: may query i see key j."""
        return self._rule(q_global[:, None], k_global[None, :]).unsqueeze(1)

    def allows(self, row: Tensor, q_global: Tensor, k_global: Tensor) -> Tensor:
        """Elementwise: may query ``q_global`` of batch row ``row`` see key ``k_global``
        (FlexAttention's ``mask_mod`` contract: scalar index tensors)."""
        return self._rule(q_global, k_global, row)
