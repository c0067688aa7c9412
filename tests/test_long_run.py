"""A long run: 10,000 tokens with on_limit="slide" past a small max_seq_len keep resident memory flat."""
from __future__ import annotations

from pathlib import Path

from tiny import TINY_MAX_LEN, tiny_onnx

from gss_runtime import Generator, Sampling

TOKENS = 10_000
WARM = 500  # tokens before the first reading: buffers, caches and the allocator have settled by then


def rss_mib() -> float:
    """This process's resident memory (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_ten_thousand_tokens_with_slide_keep_memory_bounded(tmp_path_factory):
    generator = Generator(tiny_onnx(tmp_path_factory), provider="cpu", threads=1)
    readings, made = {}, 0
    stream = generator.stream(list(b"The for"), TOKENS, sampling=Sampling(temperature=1.0), seed=0, on_limit="slide")
    for made, _ in enumerate(stream, 1):
        if made == WARM or made % 2500 == 0:
            readings[made] = rss_mib()
    readings["end"] = rss_mib()
    print(f"resident memory, MiB, by tokens made (max_seq_len {TINY_MAX_LEN}): "
          + ", ".join(f"{k}: {v:.1f}" for k, v in readings.items()))
    assert made == TOKENS  # sliding never stops early
    growth = readings["end"] - readings[WARM]
    # a state or token list kept per token would grow by far more: 9,500 slides re-read 32-token windows
    assert growth < 8, readings
