"""The prepared format stores the shared-prefix length of the packed layout (format v2).

The stored length is compared with an independent count (the tokens of the rendered first
prompt, minus one) on the bundled records cut to 1 turn and grown to 3 turns, with the byte
tokenizer and Mistral- and Qwen2-style HF tokenizers. A format-v1 directory is still read (the
length computed from the tokens) and packs to the same batches; a stored length that disagrees
with the tokens is refused naming the record.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from longpo_megatron.config import DataConfig
from longpo_megatron.data.collate import collate_shared_prefix
from longpo_megatron.data.dataset import load_dataset
from longpo_megatron.data.prepared import (
    METADATA,
    RECORD_DTYPE_V1,
    TABLE,
    PreparedDataError,
    PreparedDataset,
    identity_of,
)
from longpo_megatron.data.preprocess import WORK, job_for, load_plan, prepare
from longpo_megatron.data.records import RecordError
from longpo_megatron.data.tokenize import TokenizedPair, shared_prefix_length
from longpo_megatron.data.tokenizer import ByteChatTokenizer, HFChatTokenizer
from tests.data.hf_templates import make_hf_tokenizer, record_texts

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "data" / "toy" / "preference.jsonl"


@pytest.fixture(scope="module")
def turn_records(tmp_path_factory) -> Path:
    """Toy records cut to 1 turn (even) and grown to 3 turns (odd; documents halved)."""
    records = [json.loads(ln) for ln in TOY.read_text().splitlines() if ln.strip()][:10]
    for i, rec in enumerate(records):
        turns = rec["turns"]
        rec["turns"] = turns[:1] if i % 2 == 0 else turns + turns[:1]
        if i % 2:
            rec["document"] = rec["document"][: len(rec["document"]) // 2]
    path = tmp_path_factory.mktemp("turns") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _prompt_tokens(tok, record: dict) -> int:
    """Independent count: tokens of the first prompt rendered alone (document + first
    instruction, up to where the first response starts)."""
    user = f"{record['document']}\n\n{record['turns'][0]['instruction']}"
    if isinstance(tok, ByteChatTokenizer):
        return len(tok.encode(user)) + 4  # <bos> <user> text <eos> <assistant>
    text = tok.render_text([{"role": "user", "content": user}], generation_prompt=True)
    return len(tok.encode(text))


def _old_shared_prefix_length(pair: TokenizedPair) -> int:
    """The Python loop main used before the length was stored (kept here as the reference)."""
    limit = min(len(pair.chosen), len(pair.rejected))
    common = 0
    while common < limit and pair.chosen[common] == pair.rejected[common]:
        common += 1
    for mask in (pair.chosen_response_mask, pair.rejected_response_mask):
        first = next((t for t, r in enumerate(mask) if r), len(mask))
        common = min(common, first)
    return max(common - 1, 0)


@pytest.mark.parametrize("style", ["byte", "mistral", "qwen2"])
def test_stored_length_equals_prompt_tokens(turn_records, tmp_path, style) -> None:
    if style == "byte":
        name, tok = "byte", ByteChatTokenizer()
    else:
        name = str(make_hf_tokenizer(tmp_path / style, style, record_texts(TOY)))
        tok = HFChatTokenizer(name)
    cfg = DataConfig(path=str(turn_records), tokenizer=name)
    prepare(job_for(cfg), tmp_path / "out")
    ds = PreparedDataset(tmp_path / "out")
    records = [json.loads(ln) for ln in turn_records.read_text().splitlines()]
    assert ds.stores_shared_prefix and len(ds) == len(records)
    assert {len(r["turns"]) for r in records} == {1, 3}
    want = [_prompt_tokens(tok, r) - 1 for r in records]
    assert ds.table["shared_prefix"].tolist() == want
    memory, _ = load_dataset(cfg, tok)
    for i in range(len(ds)):
        assert ds[i].shared_prefix == memory[i].shared_prefix == want[i]
        assert _old_shared_prefix_length(ds[i]) == want[i]


def test_length_edge_cases_match_the_old_loop() -> None:
    F, T = False, True
    cases = [  # (chosen, rejected, chosen mask, rejected mask)
        ([1, 2, 3, 4], [1, 2, 3, 5], [F, F, T, T], [F, F, T, T]),  # cut at the response
        ([1, 2, 3, 4], [1, 2, 3, 4], [F, F, F, F], [F, F, F, F]),  # identical, no response
        ([1, 2, 3], [1, 2, 3, 4, 5], [F, F, F], [F, F, F, T, T]),  # one a prefix of the other
        ([7, 2], [8, 2], [F, T], [F, T]),  # nothing shared
        ([1, 9], [1, 8], [F, T], [F, T]),  # one token shared
        ([1, 2, 3, 4, 5], [1, 2, 6, 4, 5], [F] * 4 + [T], [F] * 4 + [T]),  # differ in prompt
    ]
    for ids in cases:
        pair = TokenizedPair(0, *ids)
        assert shared_prefix_length(pair) == _old_shared_prefix_length(pair), ids


def _as_v1(src: Path, dst: Path) -> None:
    """Rewrite a v2 prepared directory as format v1 (no shared-prefix column)."""
    import shutil

    shutil.copytree(src, dst)
    table = np.load(dst / TABLE)
    old = np.empty(len(table), dtype=RECORD_DTYPE_V1)
    for name in RECORD_DTYPE_V1.names:
        old[name] = table[name]
    with open(dst / TABLE, "wb") as f:
        np.save(f, old, allow_pickle=False)
    meta = json.loads((dst / METADATA).read_text())
    meta["version"] = 1
    meta["identity"] = identity_of(meta)
    (dst / METADATA).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def prepared_v2(turn_records, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("v2") / "prep"
    prepare(job_for(DataConfig(path=str(turn_records))), out)
    return out


def test_v1_directory_read_and_packs_the_same(prepared_v2, tmp_path) -> None:
    _as_v1(prepared_v2, tmp_path / "v1")
    new, old = PreparedDataset(prepared_v2), PreparedDataset(tmp_path / "v1")
    assert not old.stores_shared_prefix and old.meta["version"] == 1
    assert old.identity == json.loads((tmp_path / "v1" / METADATA).read_text())["identity"]
    pairs_new = [new[i] for i in range(len(new))]
    pairs_old = [old[i] for i in range(len(old))]
    assert pairs_old == pairs_new  # the v1 length is computed, equal to the stored one
    unstored = [TokenizedPair(**{**vars(p), "shared_prefix": None}) for p in pairs_new]
    scores = [(-1.0 - i, -2.0 - i) for i in range(len(pairs_new))]
    batches = [collate_shared_prefix(p, 256, 8, scores) for p in (pairs_new, pairs_old, unstored)]
    for other in batches[1:]:
        assert batches[0].keys() == other.keys()
        for key in batches[0]:
            assert torch.equal(batches[0][key], other[key]), key


def test_newer_format_refused(prepared_v2, tmp_path) -> None:
    import shutil

    shutil.copytree(prepared_v2, tmp_path / "v9")
    meta = json.loads((tmp_path / "v9" / METADATA).read_text())
    meta["version"] = 9
    meta["identity"] = identity_of(meta)
    (tmp_path / "v9" / METADATA).write_text(json.dumps(meta))
    with pytest.raises(PreparedDataError, match=r"metadata.json: format version 9.*longpo-prep"):
        PreparedDataset(tmp_path / "v9")


def _set_stored(root: Path, index: int, value: int) -> None:
    table = np.load(root / TABLE)
    table["shared_prefix"][index] = value
    with open(root / TABLE, "wb") as f:
        np.save(f, table, allow_pickle=False)


def test_wrong_stored_length_refused_naming_the_record(prepared_v2, tmp_path) -> None:
    import shutil

    root = tmp_path / "bad"
    shutil.copytree(prepared_v2, root)
    good = PreparedDataset(root)[3]
    for delta in (-1, 1):
        _set_stored(root, 3, good.shared_prefix + delta)
        pair = PreparedDataset(root)[3]  # in range: opens, refused when packed
        with pytest.raises(RecordError, match=rf"record {good.record_id!r}.*longpo-preprocess"):
            collate_shared_prefix([pair], 256)
    _set_stored(root, 3, 10**6)  # outside its sequences: refused when opened
    with pytest.raises(PreparedDataError, match=rf"records.npy: record {good.record_id!r}"):
        PreparedDataset(root)


def test_unfinished_preparation_of_the_old_format_refused(turn_records, tmp_path) -> None:
    job = job_for(DataConfig(path=str(turn_records)))
    out = tmp_path / "out"
    plan = load_plan(job, out)
    del plan["format"]  # what a v1 preparation wrote
    (out / WORK / "plan.json").write_text(json.dumps(plan, sort_keys=True))
    with pytest.raises(PreparedDataError, match=r"another format.*remove"):
        load_plan(job, out)
