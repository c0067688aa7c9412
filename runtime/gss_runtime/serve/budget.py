"""What a running request's decoder state can cost, known before it is admitted.

GatedDsConvLM appends one slot per token to every row of its batch (buffers with a slot axis, rows
right-aligned, so every row of a batch spans the batch's slots); a batch's state can grow to

    rows * (slots now + the most tokens any of its rows may still feed) * bytes per row and slot

and that is what admission counts. The buffers hold less: the filled slots and a headroom (at most an
eighth of them, at least 256 slots; a step multiplies the room too), grown by as much, a layer at a time,
when it runs out, never past that count (beside one layer's old buffer while it grows). The recurrent
families hold a fixed state per row: rows * bytes per row.

Each row also costs a step working memory (onnxruntime's intermediates, which its arena keeps:
for GatedStateSpacesLM about twice the row's state: the new state and a state-sized buffer), measured
once when the engine starts (`probe_step_memory`) and counted with the row.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

# the default budget: this share of the memory available when the server starts
DEFAULT_SHARE = 0.5


@dataclass(frozen=True)
class StateCost:
    """Bytes per row: of state per slot (`slot_bytes`, appended states) or fixed (`row_bytes`), and of a
    step's working memory (`work_bytes`)."""

    slot_bytes: int = 0
    row_bytes: int = 0
    work_bytes: int = 0

    @classmethod
    def of(cls, decoder, work_bytes: int = 0) -> "StateCost":
        c = decoder.config
        if decoder.bounded:
            return cls(slot_bytes=4 * c["depth"] * (c["dim_dsconv"] + c["heads"]), work_bytes=work_bytes)
        return cls(row_bytes=4 * sum(int(np.prod(s)) for s in decoder.state_shapes), work_bytes=work_bytes)

    def bytes(self, rows: int, slots: int) -> int:
        """A batch of `rows` whose buffers hold `slots` slots (ignored for a fixed state)."""
        return rows * (self.slot_bytes * slots + self.row_bytes + self.work_bytes)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def probe_step_memory(decoder, rows: int = 3) -> int:
    """Bytes of working memory each row adds to a decoder step, measured: the peak resident memory of a
    step of one row and of `rows` rows (Linux: the peak is reset through /proc/self/clear_refs). 0 where
    that cannot be read; the probe's allocations stay in onnxruntime's arena, as a first request's would."""
    def peak(k: int) -> int:
        state = decoder.empty_state([0] * k)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM back to VmRSS
        base = _status_kib("VmRSS")
        decoder.step(np.zeros(k, np.int64), state)
        return _status_kib("VmHWM") - base

    try:
        peak(1)  # the fixed part (the first call's allocations) out of the way
        one, many = peak(1), peak(rows)
    except OSError:
        return 0
    return max(0, (many - one) * 1024 // (rows - 1))


def return_freed_memory_to_the_os() -> None:
    """glibc keeps freed blocks below its mmap threshold, which grows as large blocks are freed (to 32 MiB),
    so states and prefills that come and go fragment its heap and resident memory creeps past the budget
    (measured: by one to one and a half requests' state). A fixed 1 MiB threshold returns every large
    buffer to the system when it is freed. A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


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
