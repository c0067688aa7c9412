"""How close a reduced-precision export (fp16, int8) stays to float32 eager PyTorch on held-out text.

Over every position of a few held-out windows: the top-1 agreement of the next-token
distributions and the mean KL(eager || artifact) in nats; plus the file size against the float32
export. Held-out text is the example checkpoint's held-out split (`gss_export.corpus`) for
byte-level models, or a file the user gives. A window is run alone (batch 1): dynamic int8
quantization scales activations per call, so batching unrelated windows would change results.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..errors import GSSExportError
from ..tolerances import QualityThreshold
from ..validation import eager_reference

if TYPE_CHECKING:  # annotations only
    from ..families import GatedLM

BYTE_VOCAB = 256
WINDOWS = 8  # 8 windows of 512: 4096 next-token distributions, a resolution of 0.00024 in top-1
WINDOW = 512
DECODER_STEPS = 16  # the decoder prefills each window in chunks, then feeds its last tokens one by one

Progress = Callable[[int, int, str], None]


@dataclass
class HeldOut:
    """Token ids (n,) int64 and where they came from."""

    ids: np.ndarray
    source: str


@dataclass
class QualityReport:
    artifact: str
    reference: str
    threshold: QualityThreshold
    text: str
    windows: int = 0
    window: int = 0
    top1: float = math.nan
    kl: float = math.nan
    kl_max: float = math.nan  # the worst position's KL
    bytes: int = 0
    fp32_bytes: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def size_ratio(self) -> float:
        return self.bytes / self.fp32_bytes if self.fp32_bytes else math.nan

    def to_dict(self) -> dict:
        return {"kind": "quality", **asdict(self), "size_ratio": self.size_ratio, "ok": self.ok}


def heldout(num_tokens: int, path: str | Path | None = None) -> HeldOut:
    """Held-out token ids: the example corpus's held-out split, or `path`.

    A byte-level model (num_tokens 256) reads any file as its bytes (UTF-8 text); other models need
    a file of token ids separated by whitespace or commas.
    """
    if path is None:
        if num_tokens != BYTE_VOCAB:
            raise GSSExportError(
                f"this model has num_tokens {num_tokens}, so the built-in held-out text (bytes) does not fit it: "
                "give --heldout-text FILE with token ids separated by spaces, newlines or commas"
            )
        from ..corpus import HELDOUT_FRACTION, load_corpus

        data = load_corpus()[1]
        return HeldOut(np.frombuffer(data, np.uint8).astype(np.int64),
                       f"pydoc_data.topics held-out split (last {HELDOUT_FRACTION:.0%}, {len(data)} bytes)")
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GSSExportError(f"cannot read the held-out text {path}: {e.strerror or e}") from None
    if num_tokens == BYTE_VOCAB:
        ids = np.frombuffer(data, np.uint8).astype(np.int64)
    else:
        words = [w for w in re.split(r"[\s,]+", data.decode("utf-8", errors="replace")) if w]
        bad = next((w for w in words if not re.fullmatch(r"\d+", w)), None)
        if bad is not None:
            raise GSSExportError(
                f"{path}: {bad[:20]!r} is not a token id; this model has num_tokens {num_tokens}, so the held-out "
                "text must be token ids separated by spaces, newlines or commas"
            )
        ids = np.array([int(w) for w in words], np.int64)
        if ids.size and ids.max() >= num_tokens:
            raise GSSExportError(f"{path}: token id {int(ids.max())} is out of range [0, {num_tokens})")
    if ids.size < 16:
        raise GSSExportError(f"{path} holds {ids.size} tokens; the quality check needs at least 16")
    return HeldOut(ids, f"{path} ({ids.size} tokens)")


def windows(ids: np.ndarray, max_seq_len: int, count: int = WINDOWS, length: int = WINDOW) -> np.ndarray:
    """(count, length) int64 windows spread evenly over `ids`, not overlapping; fewer or shorter if it is short."""
    length = max(2, min(length, max_seq_len, ids.size))
    count = max(1, min(count, ids.size // length))
    starts = np.linspace(0, ids.size - length, count).astype(int)
    return np.stack([ids[s : s + length] for s in starts])


def agreement(want: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 equal, KL(want || got) in nats) per position, from logits (..., vocab) in float64."""
    want, got = want.astype(np.float64), got.astype(np.float64)
    log_p = want - want.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    log_q = got - got.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    return want.argmax(-1) == got.argmax(-1), (np.exp(log_p) * (log_p - log_q)).sum(-1)


def eager_logits(model: GatedLM, batch: np.ndarray) -> tuple[np.ndarray, str]:
    """Float32 eager logits (count, length, vocab) of each window, and the reference's name."""
    reference, name = eager_reference(model)
    with torch.no_grad():
        return np.stack([reference(torch.from_numpy(w[None]))[0].numpy() for w in batch]), name


def measure(run: Callable[[np.ndarray], np.ndarray], want: np.ndarray, batch: np.ndarray, report: QualityReport,
            on_progress: Progress | None = None) -> QualityReport:
    """Fill `report` with `run`'s agreement with `want` (eager logits of `batch`) and check its threshold.

    run: ids (length,) -> logits (length, vocab).
    """
    same, kl = [], []
    for i, ids in enumerate(batch):
        if on_progress:
            on_progress(i, len(batch), f"window {i + 1} of {len(batch)}")
        try:
            got = np.asarray(run(ids))
        except Exception as e:  # an artifact that fails to run is a finding, not a crash
            report.failures.append(f"the artifact failed to run: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return report
        top, div = agreement(want[i], got)
        same.append(top)
        kl.append(div)
    report.windows, report.window = batch.shape
    report.top1 = float(np.mean(same))
    kl = np.concatenate(kl)
    report.kl, report.kl_max = float(np.mean(kl)), float(np.max(kl))
    t = report.threshold
    if not report.top1 >= t.min_top1:  # written so that NaN fails
        report.failures.append(f"top-1 agreement {report.top1:.4f} is below {t.min_top1:g} (--min-top1)")
    if not report.kl <= t.max_kl:
        report.failures.append(f"mean KL divergence {report.kl:.3g} exceeds {t.max_kl:g} (--max-kl)")
    if on_progress:
        on_progress(len(batch), len(batch), "done")
    return report


def model_runner(path: Path, backend: str = "onnxruntime", precision: str = "f32") -> Callable[[np.ndarray], np.ndarray]:
    """ids (length,) -> logits (length, vocab) through model.onnx on the CPU, opened as the runtime opens it
    (onnxruntime's int8 guard included; OpenVINO at `precision`)."""
    from gss_runtime.backends import open_graph

    graph = open_graph(path, backend, "cpu", precision=precision)
    return lambda ids: graph.run({"input_ids": ids[None]})[0][0]


def decoder_runner(path: Path, backend: str = "onnxruntime", precision: str = "f32") -> Callable[[np.ndarray], np.ndarray]:
    """ids (length,) -> logits (length, vocab) through decoder.onnx (gss_runtime): chunks, then single steps."""
    from gss_runtime.decoder import PREFILL_CHUNK, Decoder

    decoder = Decoder(path, provider="cpu", backend=backend, precision=precision, measuring=True)

    def run(ids: np.ndarray) -> np.ndarray:
        state = decoder.empty_state([0])
        cut = max(1, ids.size - DECODER_STEPS)
        logits = []
        for start in range(0, cut, PREFILL_CHUNK):
            out, state = decoder.feed(ids[None, start : min(start + PREFILL_CHUNK, cut)], state)
            logits.append(out[0])
        for token in ids[cut:]:
            out, state = decoder.step([token], state)
            logits.append(out)
        return np.concatenate(logits)

    return run
