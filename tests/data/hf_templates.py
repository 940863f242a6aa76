"""Local HF tokenizers with Mistral-, Llama-3- and Qwen2-style chat templates (no downloads).

Each is a BPE trained here on the bundled records, with the pre-tokenization of its family:
Mistral/Llama-2 (SentencePiece-style: ``▁`` prepended, spaces replaced, no pre-tokenizer),
Llama-3 and Qwen2 (byte-level BPE after their split regexes).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
    " + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
STYLES = {
    "mistral": (MISTRAL, "<s>", "</s>", ["<unk>", "<s>", "</s>"]),
    "llama3": (
        LLAMA3,
        "<|begin_of_text|>",
        "<|eot_id|>",
        ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
    ),
    "qwen2": (QWEN2, None, "<|im_end|>", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
}


def record_texts(path: Path) -> list[str]:
    """Every string of the records in ``path`` (training text for the tiny BPEs)."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.append(rec["document"])
        for turn in rec["turns"]:
            out += [turn["instruction"], turn["short_context"], turn["chosen"], turn["rejected"]]
    return out


def _backend(style: str, specials: list[str], texts: Iterable[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if style == "mistral":
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        alphabet: list[str] = [f"<0x{b:02X}>" for b in range(256)]
    else:
        pattern = LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials + (alphabet if style == "mistral" else []),
        initial_alphabet=[] if style == "mistral" else alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def make_hf_tokenizer(path: Path, style: str, texts: Iterable[str], vocab_size: int = 1200) -> Path:
    """Train and save a tokenizer of ``style`` (mistral | llama3 | qwen2) with its template."""
    from transformers import PreTrainedTokenizerFast

    template, bos, eos, specials = STYLES[style]
    backend = _backend(style, specials, texts, vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token="<unk>" if style == "mistral" else None,
        additional_special_tokens=[s for s in specials if s not in (bos, eos, "<unk>")],
    )
    fast.chat_template = template
    fast.save_pretrained(str(path))
    return path
