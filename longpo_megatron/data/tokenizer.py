"""Chat tokenizers: a byte-level project tokenizer and a wrapper around local HF tokenizers.

Both render a multi-turn conversation to token ids plus a per-token response mask that marks each
assistant response and the end-of-turn token that closes it (the tokens LongPO scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from longpo_megatron.data.records import DataError, DataFileNotFound

Pairs = Sequence[tuple[str, str]]
"""A conversation as (user text, assistant text) pairs, in order."""


@runtime_checkable
class ChatTokenizer(Protocol):
    """What the data stage needs from a tokenizer."""

    name: str
    vocab_size: int
    pad_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Plain text to ids (no special tokens added)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Ids back to text."""
        ...

    def render_turns(self, pairs: Pairs) -> tuple[list[int], list[bool]]:
        """Render a conversation; see :func:`render_chat`."""
        ...


def render_chat(tokenizer: ChatTokenizer, pairs: Pairs) -> tuple[list[int], list[bool]]:
    """Render (user, assistant) pairs to ``(ids, response_mask)``.

    ``response_mask[t]`` is True when token t belongs to an assistant response or is the
    end-of-turn token that closes one. The mask has exactly one entry per id.
    """
    if not pairs:
        raise ValueError("render_chat needs at least one (user, assistant) pair")
    ids, mask = tokenizer.render_turns(pairs)
    if len(ids) != len(mask):
        raise AssertionError(f"{tokenizer.name}: {len(ids)} ids but {len(mask)} mask entries")
    return ids, mask


class ByteChatTokenizer:
    """Ids 0..255 are UTF-8 bytes; then pad, bos, eos (end of turn), user, assistant.

    Template: ``<bos>`` once, then per turn ``<user>{user}<eos><assistant>{response}<eos>``.
    The vocabulary is padded to 264 so it divides tensor-parallel sizes 2, 4 and 8.
    """

    name = "byte"
    PAD, BOS, EOS, USER, ASSISTANT = 256, 257, 258, 259, 260
    SPECIAL_NAMES = {256: "<pad>", 257: "<bos>", 258: "<eos>", 259: "<user>", 260: "<assistant>"}
    vocab_size = 264
    pad_id = PAD
    bos_id = BOS
    eos_id = EOS

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Bytes back to text; specials render as ``<name>`` unless ``skip_special``."""
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if not skip_special:
                out.append(self.SPECIAL_NAMES.get(i, f"<unused_{i}>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def render_turns(self, pairs: Pairs) -> tuple[list[int], list[bool]]:
        """Render with the byte template; the response mask covers response bytes + its eos."""
        ids = [self.BOS]
        mask = [False]
        for user, assistant in pairs:
            prompt = [self.USER, *self.encode(user), self.EOS, self.ASSISTANT]
            response = [*self.encode(assistant), self.EOS]
            ids += prompt + response
            mask += [False] * len(prompt) + [True] * len(response)
        return ids, mask


class HFChatTokenizer:
    """A local Hugging Face tokenizer rendered through its own chat template.

    Response spans are located exactly by rendering the conversation prefix by prefix: each
    rendered prefix must be a token-prefix of the next. Templates that rewrite earlier turns (or
    BPE merges across a turn boundary) make that impossible and raise a ValueError.
    """

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self.name = str(path)
        self._tok: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if not getattr(self._tok, "chat_template", None):
            raise DataError(f"tokenizer {self.name!r} has no chat template")
        eos = self._tok.eos_token_id
        if eos is None:
            raise DataError(f"tokenizer {self.name!r} has no eos token (end of turn)")
        self.eos_id: int = int(eos)
        pad = self._tok.pad_token_id
        self.pad_id: int = int(pad) if pad is not None else self.eos_id
        self.vocab_size: int = len(self._tok)

    def encode(self, text: str) -> list[int]:
        """Text to ids without added special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Ids back to text; special tokens kept unless ``skip_special``."""
        return str(self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special))

    def render_text(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        """The chat template's text of ``messages`` (not tokenized)."""
        try:
            return str(
                self._tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=generation_prompt
                )
            )
        except Exception as exc:  # jinja errors name nothing useful; say which tokenizer
            raise DataError(f"chat template of tokenizer {self.name!r} failed: {exc}") from exc

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` and each token's (start, end) character span (fast tokenizers)."""
        enc = self._tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    @property
    def is_fast(self) -> bool:
        """True for a Rust-backed tokenizer (character offsets available)."""
        return bool(getattr(self._tok, "is_fast", False))

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        return self.encode(self.render_text(messages, generation_prompt))

    def not_prefix_stable(self, turn: int, what: str) -> DataError:
        """The error for a rendering whose tokens change when the conversation grows."""
        return DataError(
            f"chat template of tokenizer {self.name!r} is not prefix-stable: rendering "
            f"{what} of turn {turn} changes the tokens of the earlier conversation, so "
            "response tokens cannot be located exactly"
        )

    def _check_prefix(self, prefix: list[int], ids: list[int], turn: int, what: str) -> None:
        if ids[: len(prefix)] != prefix:
            raise self.not_prefix_stable(turn, what)

    def _span_mask(self, span: list[int], turn: int) -> list[bool]:
        """Mark the response up to and including its last eos; template glue after it is not."""
        if not span:
            raise ValueError(f"tokenizer {self.name!r}: turn {turn} renders an empty response")
        if self.eos_id not in span:
            return [True] * len(span)
        last = len(span) - 1 - span[::-1].index(self.eos_id)
        return [True] * (last + 1) + [False] * (len(span) - last - 1)

    def render_turns(self, pairs: Pairs) -> tuple[list[int], list[bool]]:
        """Render prefix by prefix so every response span is known exactly."""
        messages: list[dict[str, str]] = []
        done: list[int] = []
        mask: list[bool] = []
        for turn, (user, assistant) in enumerate(pairs):
            messages.append({"role": "user", "content": user})
            prompt = self._render(messages, generation_prompt=True)
            self._check_prefix(done, prompt, turn, "the user message")
            messages.append({"role": "assistant", "content": assistant})
            full = self._render(messages, generation_prompt=False)
            self._check_prefix(prompt, full, turn, "the assistant response")
            mask += [False] * (len(prompt) - len(done))
            mask += self._span_mask(full[len(prompt) :], turn)
            done = full
        return done, mask


def build_tokenizer(name_or_path: str) -> ChatTokenizer:
    """``"byte"`` gives :class:`ByteChatTokenizer`; anything else is a local HF tokenizer dir."""
    if name_or_path == "byte":
        return ByteChatTokenizer()
    path = Path(name_or_path)
    if not path.exists():
        raise DataFileNotFound(
            f"tokenizer {name_or_path!r} is neither 'byte' nor an existing local tokenizer "
            "directory (downloads are not attempted)"
        )
    return HFChatTokenizer(path)
