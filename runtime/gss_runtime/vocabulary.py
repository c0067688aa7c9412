"""How a model's token ids map to text: bytes for byte-level models, none for the others.

A byte-level model (num_tokens 256) reads its ids as the UTF-8 bytes of the text. Other models
here take and return ids only: their text is the ids written out (" 12 7 301"), and they have no
way from text to ids, which `encode` says.

Token strings (for log-probabilities and top lists) are unique per id: a byte below 0x80 is its
character; any other byte, never valid UTF-8 on its own, is written `bytes:\\xNN` (as OpenAI writes
partial characters); an id of a model without text is vLLM's `token_id:N`.
"""
from __future__ import annotations

import codecs
from typing import Sequence

BYTE_VOCAB = 256


class NoTextMapping(ValueError):
    """The model has ids only: there is no text to take or to give back."""


class Vocabulary:
    """Text for one model's ids. `size`: num_tokens; `text`: whether text maps to ids at all."""

    def __init__(self, size: int):
        self.size = size
        self.text = size == BYTE_VOCAB
        self.kind = "bytes" if self.text else "ids"
        self._pieces = [self._piece(t) for t in range(size)] if self.text else None

    def encode(self, text: str, special: bool = True) -> list[int]:
        """Text -> ids (its UTF-8 bytes: bytes have no special tokens to add); NoTextMapping for a model without text."""
        if not self.text:
            raise NoTextMapping(f"this model's tokens are not bytes (num_tokens {self.size}) and it has no "
                                "tokenizer: it takes and gives token ids only")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, as a reply shows it: bytes as UTF-8 (invalid ones as U+FFFD), other ids as ' 1 2'."""
        stream = self.stream()
        return stream.add(ids) + stream.end()

    def piece(self, token: int) -> str:
        """The token's own string, unique per id."""
        return self._pieces[token] if self._pieces is not None else self._piece(token)

    def _piece(self, token: int) -> str:
        if not self.text:
            return f"token_id:{token}"
        return chr(token) if token < 0x80 else f"bytes:\\x{token:02x}"

    def stream(self) -> "TextStream":
        return TextStream(self.text)

    def eos_token(self, eos_id: int | None) -> str | None:
        """The end-of-sequence token as text (what /tokenize turns back into eos_id), or None."""
        if eos_id is None or not self.text:
            return None
        return bytes([eos_id]).decode("utf-8", errors="replace") if eos_id < 0x80 else None


class TextStream:
    """Text of ids as they come: a character split over several bytes appears once it is whole."""

    def __init__(self, byte_level: bool):
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if byte_level else None

    def add(self, ids: Sequence[int]) -> str:
        if self.utf8 is None:
            return "".join(f" {t}" for t in ids)
        return self.utf8.decode(bytes(ids))

    def offsets(self, ids: Sequence[int], start: int) -> tuple[str, list[int]]:
        """The text of `ids` and each id's offset in the whole text: how much of it came before that id
        (`start`: the text's length before these ids)."""
        offsets, pieces = [], []
        for t in ids:
            offsets.append(start)
            piece = self.add([t])
            pieces.append(piece)
            start += len(piece)
        return "".join(pieces), offsets

    def end(self) -> str:
        """What is still held back (an incomplete character, as U+FFFD)."""
        return self.utf8.decode(b"", final=True) if self.utf8 is not None else ""


class StopText:
    """Stop strings found in text as it streams: `add` returns the text safe to show and whether a stop
    string was reached (the text then ends just before it). Text that may yet become a stop string is
    held back; `end` gives it up when the text ends another way."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def add(self, text: str) -> tuple[str, bool]:
        held = self.held + text
        hits = [i for i in (held.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return held[: min(hits)], True
        # the longest tail that some stop string starts with
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(held)), 0, -1) if held.endswith(s[:k])), default=0)
        self.held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    def end(self) -> str:
        out, self.held = self.held, ""
        return out
