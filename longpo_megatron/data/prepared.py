"""Prepared datasets: records tokenized once into megatron-core indexed files, read lazily.

A prepared dataset is a directory (written by ``longpo-preprocess``, docs/data-format.md):

- ``tokens.bin/.idx``: token ids (uint16 when the vocabulary fits, else int32). One indexed
  *document* per record, holding its sequences in order: long chosen, long rejected, then per
  turn the short chosen and short rejected reference sequences.
- ``spans.bin/.idx`` (int32): per sequence, its response-mask runs ``[start, end, ...]``.
- ``ids.bin/.idx`` (uint8): per record, its id in UTF-8.
- ``records.npy``: per record its source line, turns, lengths, CRC-32 of its tokens and spans,
  the reference fingerprints (:func:`~longpo_megatron.reference.sequences.fingerprint`) and
  (format v2) the shared-prefix length of the packed layout (``data.shared_prefix``).
- ``metadata.json``: format, tokenizer identity, chat-template hash, the source's sha256,
  limits, counts, skipped records and their reasons, and the dataset's identity hash.

Format v1 (no shared-prefix column) is still read: the length is then computed from the tokens
when a record is read, exactly as v2 stores it, so a v1 directory keeps its identity (and a run
resumes on it) without being prepared again.

Every rank maps the files read-only and materializes only the pairs it is asked for, so memory
per rank does not grow with the dataset. Structure (headers, sizes, counts, lengths) is checked
when opened; a record's CRC when it is read.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from longpo_megatron.data.dataset import PreferenceDataset
from longpo_megatron.data.records import DataReport
from longpo_megatron.data.render import spans_to_mask
from longpo_megatron.data.tokenize import TokenizedPair, shared_prefix_length
from longpo_megatron.data.tokenizer import ByteChatTokenizer, ChatTokenizer
from longpo_megatron.errors import UserError

FORMAT = "longpo-prepared"
VERSION = 2
"""Format written; v2 added ``shared_prefix`` to ``records.npy``."""
READABLE = (1, 2)
"""Formats read (v1: the shared-prefix length is computed when a record is read)."""
METADATA = "metadata.json"
TABLE = "records.npy"
PREFIXES = ("tokens", "spans", "ids")
IDX_HEADER_BYTES = 34
"""megatron-core .idx: magic (9) + version (8) + dtype code (1) + sequence and document counts."""
RECORD_DTYPE = np.dtype(
    [
        ("line", "<i8"),
        ("turns", "<i4"),
        ("long_chosen", "<i4"),
        ("long_rejected", "<i4"),
        ("short_tokens", "<i8"),
        ("crc_tokens", "<u4"),
        ("crc_spans", "<u4"),
        ("fp_short", "u1", (32,)),
        ("fp_long", "u1", (32,)),
        ("shared_prefix", "<i4"),
    ]
)
"""One row of ``records.npy`` (format v2)."""
RECORD_DTYPE_V1 = np.dtype(RECORD_DTYPE.descr[:-1])
"""One row of a format-v1 ``records.npy`` (no shared-prefix length)."""
LIMIT_KEYS = ("max_seq_length", "max_ref_seq_length", "over_length_policy")


class PreparedDataError(UserError, ValueError):
    """A prepared dataset that cannot be used; names the file and the rule broken."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (megatron-core's rule), else int32."""
    from megatron.core.datasets.indexed_dataset import DType

    return np.dtype(DType.optimal_dtype(vocab_size))


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenizer_identity(tok: ChatTokenizer) -> dict[str, Any]:
    """Name, vocabulary size, hash of the tokenizer's rules and hash of its chat template."""
    if isinstance(tok, ByteChatTokenizer):
        rules = json.dumps([tok.vocab_size, sorted(tok.SPECIAL_NAMES.items())])
        template = "<bos>{<user>{user}<eos><assistant>{assistant}<eos>}*"
    else:
        backend = getattr(tok._tok, "backend_tokenizer", None)  # type: ignore[attr-defined]
        rules = backend.to_str() if backend is not None else json.dumps(tok._tok.get_vocab())  # type: ignore[attr-defined]
        template = str(tok._tok.chat_template)  # type: ignore[attr-defined]
    return {
        "name": tok.name,
        "vocab_size": int(tok.vocab_size),
        "eos_id": int(tok.eos_id),
        "sha256": hashlib.sha256(rules.encode()).hexdigest(),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
    }


def identity_of(meta: dict[str, Any]) -> str:
    """sha256 of everything that defines the prepared content: the metadata minus itself and
    the source's path (a renamed but unchanged source keeps its identity)."""
    body = {k: v for k, v in meta.items() if k != "identity"}
    body["source"] = {k: v for k, v in meta.get("source", {}).items() if k != "path"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_metadata(root: Path) -> dict[str, Any]:
    """Parse and sanity-check ``metadata.json``."""
    path = root / METADATA
    if not path.is_file():
        raise PreparedDataError(f"{path}: missing (not a prepared dataset; run longpo-preprocess)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PreparedDataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PreparedDataError(f"{path}: not a {FORMAT} metadata file")
    if meta.get("version") not in READABLE:
        raise PreparedDataError(
            f"{path}: format version {meta.get('version')!r}, this reader supports "
            f"{', '.join(map(str, READABLE))}; prepare the data again with longpo-preprocess"
        )
    if meta.get("identity") != identity_of(meta):
        raise PreparedDataError(f"{path}: identity hash does not match its content (edited?)")
    return meta


def check_compatible(
    root: Path, meta: dict[str, Any], tok: ChatTokenizer, data_cfg: Optional[Any]
) -> None:
    """Refuse a prepared dataset made with another tokenizer, template or (when ``data_cfg`` is
    given) limits."""
    path = root / METADATA
    want = tokenizer_identity(tok)
    have = meta["tokenizer"]
    for key, rule in (
        ("sha256", "tokenizer"),
        ("chat_template_sha256", "chat template"),
        ("vocab_size", "tokenizer vocabulary size"),
    ):
        if have.get(key) != want[key]:
            raise PreparedDataError(
                f"{path}: prepared with another {rule} ({have.get('name')!r}, {key} "
                f"{str(have.get(key))[:16]}) than data.tokenizer={tok.name!r} "
                f"({str(want[key])[:16]}); prepare the data again with this tokenizer"
            )
    for key in LIMIT_KEYS if data_cfg is not None else ():
        run = getattr(data_cfg, key)
        if key == "over_length_policy" and not meta["skipped"]:
            continue  # nothing was skipped: the data is the same under either policy
        if meta["limits"].get(key) != run:
            raise PreparedDataError(
                f"{path}: prepared with {key}={meta['limits'].get(key)!r} but this run has "
                f"data.{key}={run!r}; prepare the data again with the run's limits"
            )


def _open_indexed(prefix: Path, dtype: np.dtype, sequences: int, documents: int):
    """Open one megatron-core indexed dataset after checking its header and sizes."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    idx, bin_ = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    for f in (idx, bin_):
        if not f.is_file():
            raise PreparedDataError(f"{f}: missing")
    head = idx.read_bytes()[:IDX_HEADER_BYTES]
    want_head = b"MMIDIDX\x00\x00" + (1).to_bytes(8, "little")
    want_head += bytes([DType.code_from_dtype(dtype.type)])
    want_head += sequences.to_bytes(8, "little") + documents.to_bytes(8, "little")
    if head != want_head:
        raise PreparedDataError(
            f"{idx}: header is not a megatron-core index of {sequences} {dtype.name} sequences "
            f"in {documents - 1} records (corrupted, or from another dataset)"
        )
    size = IDX_HEADER_BYTES + 12 * sequences + 8 * documents
    if idx.stat().st_size != size:
        raise PreparedDataError(f"{idx}: {idx.stat().st_size} bytes, expected {size} (truncated?)")
    ds = IndexedDataset(str(prefix))
    lengths, pointers = ds.sequence_lengths, ds.index.sequence_pointers
    expect = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if sequences else 0
    steps = np.diff(pointers) == lengths[:-1].astype(np.int64) * dtype.itemsize
    if (lengths < 0).any() or not steps.all() or (sequences and pointers[0] != 0):
        raise PreparedDataError(f"{idx}: sequence lengths and offsets disagree (corrupted)")
    if bin_.stat().st_size != expect:
        raise PreparedDataError(
            f"{bin_}: {bin_.stat().st_size} bytes, its index says {expect} (truncated or corrupted)"
        )
    return ds


class PreparedWriter:
    """Writes the indexed files and ``records.npy`` of a prepared dataset (or of one piece)."""

    def __init__(self, root: Path, dtype: np.dtype) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.root, self.dtype = Path(root), np.dtype(dtype)
        self.root.mkdir(parents=True, exist_ok=True)
        kinds = {"tokens": self.dtype, "spans": np.dtype(np.int32), "ids": np.dtype(np.uint8)}
        self.builders = {
            k: IndexedDatasetBuilder(str(self.root / f"{k}.bin"), dtype=d.type)
            for k, d in kinds.items()
        }
        self.rows: list[tuple] = []

    def add_pair(self, pair: TokenizedPair, line: int) -> None:
        """Append one tokenized record (its masks stored as spans)."""
        from longpo_megatron.data.render import mask_to_spans
        from longpo_megatron.reference.sequences import fingerprint

        seqs = [
            (pair.chosen, pair.chosen_response_mask),
            (pair.rejected, pair.rejected_response_mask),
        ]
        for c, r in zip(pair.ref_chosen, pair.ref_rejected):
            seqs += [c, r]
        tokens = [np.asarray(ids, dtype=self.dtype) for ids, _ in seqs]
        spans = [mask_to_spans(mask) for _, mask in seqs]
        fps = [
            np.frombuffer(bytes.fromhex(fingerprint(pair, v)), np.uint8) for v in ("short", "long")
        ]
        short = sum(len(ids) for ids, _ in seqs[2:])
        k = pair.shared_prefix if pair.shared_prefix is not None else shared_prefix_length(pair)
        lengths = (len(pair.ref_chosen), len(pair.chosen), len(pair.rejected), short)
        row = (line, *lengths, 0, 0, *fps, k)
        self.add_raw(tokens, spans, pair.record_id.encode("utf-8"), row)

    def add_raw(self, tokens: list[np.ndarray], spans: list[np.ndarray], rid: bytes, row) -> None:
        """Append one record given as arrays and a table row (CRCs are recomputed)."""
        crcs = []
        for kind, seqs in (("tokens", tokens), ("spans", spans)):
            crc = 0
            for s in seqs:
                crc = zlib.crc32(np.ascontiguousarray(s), crc)
            crcs.append(crc)
            flat = np.concatenate(seqs) if seqs else np.zeros(0)
            self.builders[kind].add_document(flat, [len(s) for s in seqs])
        self.builders["ids"].add_document(np.frombuffer(rid, np.uint8), [len(rid)])
        row = tuple(row)
        self.rows.append((*row[:5], crcs[0], crcs[1], *row[7:]))

    def finalize(self) -> np.ndarray:
        """Write the ``.idx`` files and ``records.npy``; returns the record table."""
        for kind, builder in self.builders.items():
            builder.finalize(str(self.root / f"{kind}.idx"))
        table = np.array(self.rows, dtype=RECORD_DTYPE)
        with open(self.root / TABLE, "wb") as f:
            np.save(f, table, allow_pickle=False)
        return table


def write_metadata(root: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Stamp ``meta`` with its identity and write it atomically as ``metadata.json``."""
    meta = dict(meta, format=FORMAT, version=VERSION)
    meta["identity"] = identity_of(meta)
    tmp = root / (METADATA + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    tmp.replace(root / METADATA)
    return meta


class PreparedDataset(PreferenceDataset):
    """A prepared dataset read lazily; the interface of :class:`PreferenceDataset`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.meta = meta = read_metadata(self.root)
        counts = meta["counts"]
        n, seqs = int(counts["records"]), int(counts["sequences"])
        self.token_dtype = np.dtype(meta["token_dtype"])
        self.tokens = _open_indexed(self.root / "tokens", self.token_dtype, seqs, n + 1)
        self.spans = _open_indexed(self.root / "spans", np.dtype(np.int32), seqs, n + 1)
        self.ids = _open_indexed(self.root / "ids", np.dtype(np.uint8), n, n + 1)
        self.table = self._open_table(n)
        self._check_structure()
        self.pairs = None
        self.records = None
        self._ref = torch.full((n, 2), math.nan, dtype=torch.float64)
        self._ref_tokens: dict[int, torch.Tensor] = {}

    def _open_table(self, n: int) -> np.ndarray:
        path = self.root / TABLE
        try:
            table = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise PreparedDataError(f"{path}: not a readable .npy table ({exc})") from None
        version = self.meta["version"]
        if table.dtype != (RECORD_DTYPE if version == 2 else RECORD_DTYPE_V1) or table.shape != (
            n,
        ):
            raise PreparedDataError(f"{path}: expected {n} rows of the v{version} record table")
        return table

    def _check_structure(self) -> None:
        """Per-record counts and lengths agree between the index files and records.npy."""
        docs = np.asarray(self.tokens.document_indices)
        t = self.table
        idx = self.root / "tokens.idx"
        if not np.array_equal(docs, self.spans.document_indices) or not np.array_equal(
            np.diff(docs), 2 + 2 * t["turns"].astype(np.int64)
        ):
            raise PreparedDataError(f"{idx}: records do not hold 2 + 2 x turns sequences")
        lengths = self.tokens.sequence_lengths
        first = docs[:-1]
        if not (
            np.array_equal(lengths[first], t["long_chosen"])
            and np.array_equal(lengths[first + 1], t["long_rejected"])
        ):
            raise PreparedDataError(f"{idx}: long sequence lengths disagree with {TABLE}")
        if not np.array_equal(self.ids.document_indices, np.arange(len(t) + 1)):
            raise PreparedDataError(f"{self.root / 'ids.idx'}: not one id per record")
        if self.stores_shared_prefix:
            k = t["shared_prefix"]
            bad = np.flatnonzero((k < 0) | (k >= np.minimum(t["long_chosen"], t["long_rejected"])))
            if bad.size:
                raise PreparedDataError(
                    f"{self.root / TABLE}: record {self.record_id(int(bad[0]))!r} (index "
                    f"{int(bad[0])}): shared-prefix length {int(k[bad[0]])} outside its sequences"
                )

    @property
    def stores_shared_prefix(self) -> bool:
        """True for format v2 (``records.npy`` holds the shared-prefix lengths)."""
        return "shared_prefix" in (self.table.dtype.names or ())

    def __len__(self) -> int:
        return len(self.table)

    @property
    def identity(self) -> str:
        """The prepared dataset's identity hash (metadata)."""
        return str(self.meta["identity"])

    def record_id(self, index: int) -> str:
        """The id of pair ``index`` (reads only that record's id bytes)."""
        return self.ids[index].tobytes().decode("utf-8")

    def pair_fingerprint(self, index: int, view: str) -> str:
        """Stored reference fingerprint of pair ``index`` for ``view`` (short | long)."""
        return self.table[f"fp_{view}"][index].tobytes().hex()

    def _read(self, ds, index: int, crc_key: str, name: str) -> list[np.ndarray]:
        lo, hi = (int(x) for x in ds.document_indices[index : index + 2])
        seqs = ds[lo:hi]
        crc = 0
        for s in seqs:
            crc = zlib.crc32(np.ascontiguousarray(s), crc)
        if crc != int(self.table[crc_key][index]):
            raise PreparedDataError(
                f"{self.root / name}: record {self.record_id(index)!r} (index {index}) fails its "
                "CRC-32 check (the file is corrupted)"
            )
        return seqs

    def __getitem__(self, index: int) -> TokenizedPair:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} out of range ({len(self)} pairs)")
        toks = self._read(self.tokens, index, "crc_tokens", "tokens.bin")
        spans = self._read(self.spans, index, "crc_spans", "spans.bin")
        seqs = [(t.tolist(), spans_to_mask(s, len(t))) for t, s in zip(toks, spans)]
        (chosen, c_mask), (rejected, r_mask) = seqs[0], seqs[1]
        pair = TokenizedPair(
            index=index,
            chosen=chosen,
            rejected=rejected,
            chosen_response_mask=c_mask,
            rejected_response_mask=r_mask,
            ref_chosen=seqs[2::2],
            ref_rejected=seqs[3::2],
            record_id=self.record_id(index),
        )
        if self.stores_shared_prefix:  # checked against the tokens when packed (collate)
            pair.shared_prefix = int(self.table["shared_prefix"][index])
        else:  # format v1: computed from the tokens, as v2 stores it
            pair.shared_prefix = shared_prefix_length(pair)
        return pair

    def report(self) -> DataReport:
        """The preprocessing report (lines read, records kept, skips by reason)."""
        skipped = self.meta["skipped"]
        return DataReport(
            path=str(self.meta["source"]["path"]),
            lines_read=int(self.meta["counts"]["lines"]),
            records_ok=len(self),
            skipped=Counter(s["reason"] for s in skipped),
            problems=[(int(s["line"]), str(s["reason"])) for s in skipped],
            messages=[str(s["message"]) for s in skipped],
        )


def open_prepared(
    root: str | Path, tokenizer: ChatTokenizer, data_cfg: Optional[Any] = None
) -> PreparedDataset:
    """Open and verify a prepared dataset for a run with ``tokenizer`` and ``data_cfg``."""
    ds = PreparedDataset(root)
    check_compatible(ds.root, ds.meta, tokenizer, data_cfg)
    if len(ds) == 0:
        raise PreparedDataError(
            f"{ds.root / METADATA}: no usable records ({ds.report().summary()})"
        )
    return ds
