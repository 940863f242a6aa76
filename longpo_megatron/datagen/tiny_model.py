"""A tiny random Llama chat model plus a small BPE tokenizer, built locally (no downloads).

Used by the tests and the CPU demo of ``longpo-datagen``: the weights are random, so its text is
noise, but it exercises the real ``transformers`` generation path (chat template, batching, left
padding, end-of-turn stopping) at a size that runs in seconds on two CPU cores.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

SPECIALS = ["<|pad|>", "<|bos|>", "<|eot|>", "<|user|>", "<|assistant|>", "<|unk|>"]
CHAT_TEMPLATE = (
    "<|bos|>{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|eot|>"
    "{% else %}<|assistant|>{{ m['content'] }}<|eot|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""Special tokens at every turn boundary keep renderings prefix-stable (see HFChatTokenizer)."""


def make_tiny_tokenizer(path: str | Path, texts: Iterable[str], vocab_size: int = 512) -> Path:
    """Train a byte-level BPE tokenizer on ``texts`` and save it (with a chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|unk|>",
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eot|>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    out = Path(path)
    fast.save_pretrained(str(out))
    return out


def make_tiny_model(
    path: str | Path,
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    max_positions: int = 16384,
    eos_bias: float = 0.0,
    seed: int = 0,
) -> Path:
    """Save a tiny random ``LlamaForCausalLM`` and its tokenizer under ``path``.

    ``eos_bias`` > 0 is stored in the generation config as a logit bias on the end-of-turn
    token, so that sampled answers stop after some dozens of tokens instead of always running
    to ``max_new_tokens`` (the weights stay random).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = make_tiny_tokenizer(path, texts, vocab_size)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    if eos_bias:
        model.generation_config.sequence_bias = [[[tok.eos_token_id], float(eos_bias)]]
    model.save_pretrained(str(out))
    return out


def main() -> None:
    """``python -m longpo_megatron.datagen.tiny_model OUT_DIR``: build from data/corpus."""
    import json
    import sys

    root = Path(__file__).resolve().parents[2] / "data" / "corpus"
    texts: list[str] = []
    for path in sorted(root.iterdir()):
        if path.suffix == ".jsonl":
            texts += [json.loads(line)["text"] for line in path.read_text().splitlines()]
        elif path.suffix in (".txt", ".md", ".tex"):
            texts.append(path.read_text())
    out = make_tiny_model(sys.argv[1], texts, eos_bias=2.5)
    print(f"tiny model written to {out}")


if __name__ == "__main__":
    main()
