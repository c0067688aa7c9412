"""What a running request's decoder state can cost, known before it is admitted.

GatedDsConvLM appends one slot per token to every row of its batch (slot-major buffers, rows
right-aligned, so every row of a batch spans the batch's slots); a batch's state can grow to

    rows * (slots now + the most tokens any of its rows may still feed) * bytes per row and slot

and the engine allocates exactly that when it forms the batch, so the state never grows (copies)
while it runs. The recurrent families hold a fixed state per row: rows * bytes per row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

# the default budget: this share of the memory available when the server starts
DEFAULT_SHARE = 0.5


@dataclass(frozen=True)
class StateCost:
    """Bytes of decoder state per row: per slot (`slot_bytes`, appended states) or fixed (`row_bytes`)."""

    slot_bytes: int = 0
    row_bytes: int = 0

    @classmethod
    def of(cls, decoder) -> "StateCost":
        c = decoder.config
        if decoder.bounded:
            return cls(slot_bytes=4 * c["depth"] * (c["dim_dsconv"] + c["heads"]))
        return cls(row_bytes=4 * sum(int(np.prod(s)) for s in decoder.state_shapes))

    def bytes(self, rows: int, slots: int) -> int:
        """A batch of `rows` whose buffers hold `slots` slots (ignored for a fixed state)."""
        return rows * (self.slot_bytes * slots + self.row_bytes)


def lifetime_feeds(prompt_tokens: int, max_tokens: int, limit: int | None) -> int:
    """Tokens a request feeds to the decoder after its prompt: every sampled token but the last, and
    (with a bounded context) none past `limit`."""
    feeds = max(max_tokens - 1, 0)
    return feeds if limit is None else max(min(feeds, limit - prompt_tokens), 0)


def available_memory() -> int | None:
    """Bytes the kernel says can be had without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget() -> int | None:
    """DEFAULT_SHARE of the memory available now; None (no budget) where that cannot be read."""
    free = available_memory()
    return int(free * DEFAULT_SHARE) if free else None


_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}


def parse_size(text: str) -> int:
    """'512M', '4GiB', '1.5g', '1000000' -> bytes (binary units); ValueError naming the problem."""
    s = text.strip().lower().replace(" ", "")
    number = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(number):]
    if unit not in _UNITS or not number:
        raise ValueError(f"{text!r} is not a size: give bytes, or a number with K, M, G or T (binary units)")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a size: give bytes, or a number with K, M, G or T (binary units)") from None
    if not np.isfinite(value) or value < 1:
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


def format_size(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"
