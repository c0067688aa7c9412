"""A small byte-level corpus every Python install has: the bundled pydoc topic texts.

`pydoc_data.topics.topics` ships with CPython (~79 documentation topics, ~466 KB), so the
example checkpoint can be retrained and evaluated offline, with no download. The held-out split
(the tail) is what the fp16 / int8 exports are checked on by default.
"""
from __future__ import annotations

HELDOUT_FRACTION = 0.05  # last 5% of the bytes: never trained on, used for held-out loss / fp16 / int8 checks


def corpus_bytes() -> bytes:
    """All topic texts in sorted-key order, joined by blank lines, as UTF-8 bytes (tokens 0..255)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def load_corpus(heldout_fraction: float = HELDOUT_FRACTION) -> tuple[bytes, bytes]:
    """(train, heldout): a deterministic split, held-out is the tail of the corpus."""
    data = corpus_bytes()
    cut = len(data) - int(len(data) * heldout_fraction)
    return data[:cut], data[cut:]
