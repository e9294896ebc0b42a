"""Tokenizers: the embedded byte-level one and an adapter for Hugging Face tokenizers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from shared.core.errors import ConfigError

Message = dict[str, str]

DEFAULT_MODEL = "default"  # the embedded model
RANDOM_PREFIX = "random:"  # "random:<shape>": random weights in a real model's shape


def uses_byte_tokenizer(source: str) -> bool:
    """Whether a model source is one of Cake's built-in ones (byte-level vocabulary)."""
    return source == DEFAULT_MODEL or source.startswith(RANDOM_PREFIX)


class Tokenizer(Protocol):
    """What Cake needs from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1."""

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt (with the model's begin-of-sequence token, if any)."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens left out."""

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of a chat conversation, ready for the assistant's reply."""


def plain_chat_prompt(messages: Sequence[Message]) -> str:
    """A simple chat layout for tokenizers that ship no chat template."""
    turns = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
    return "".join(turns) + "<|assistant|>\n"


class ByteTokenizer:
    """One token per UTF-8 byte (ids 0-255) plus begin/end-of-sequence specials."""

    BOS = 256
    EOS = 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        """[BOS] followed by the UTF-8 bytes of text."""
        return [self.BOS, *text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """UTF-8 text of the byte ids; specials are dropped, broken sequences replaced."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """The plain chat layout, byte-encoded."""
        return self.encode(plain_chat_prompt(messages))


class HFTokenizer:
    """Adapter for a transformers tokenizer (local directory or hub id)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    @property
    def vocab_size(self) -> int:
        """Its vocabulary, added tokens included."""
        return len(self.inner)

    def encode(self, text: str) -> list[int]:
        """The tokenizer's ids, with its special tokens (BOS where the model uses one)."""
        return list(self.inner.encode(text, add_special_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        """Text without special tokens."""
        return str(self.inner.decode(list(ids), skip_special_tokens=True))

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """The tokenizer's chat template when it has one, the plain layout otherwise."""
        if getattr(self.inner, "chat_template", None):
            text = self.inner.apply_chat_template(
                list(messages), tokenize=False, add_generation_prompt=True
            )
            return list(self.inner.encode(text, add_special_tokens=False))
        return self.encode(plain_chat_prompt(messages))


def load_tokenizer(source: str, revision: str | None = None) -> Tokenizer:
    """The tokenizer for a model source (built-in models use the byte-level one)."""
    if uses_byte_tokenizer(source):
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(source, revision=revision))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load a tokenizer from {source!r}: {exc}") from exc
