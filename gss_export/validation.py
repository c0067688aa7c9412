"""Run an exported artifact against eager PyTorch: names, then shapes, then values.

Every failure is collected and reported together. The reference is the upstream package's
eager model (gated-state-spaces-pytorch) when installed, else this package's eager model
under the torch.fft form (the report names which).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from .tolerances import Tolerance

if TYPE_CHECKING:  # annotations only: what validation needs of a family it reads from the model's config
    from .families import GatedLM

DEFAULT_BATCHES = (1, 3)
# both sides of the FFT form's power-of-two boundaries (2n-1 crosses 128 at n=64/65, 256 at 128/129)
# 2/3, 16/17, 128/129, 1024/1025 and 8192/8193 straddle the monarch form's block-size changes, 128/129 the FFT form's
DEFAULT_LENGTHS = (1, 2, 3, 7, 16, 17, 64, 65, 100, 127, 128, 129, 1000, 1024, 1025, 8192, 8193)

# Tokens per checked call (batch x length) beyond which a length is checked at batch 1 only: a batch of 3
# at 65,536 tokens needs about 7 GB of activations in onnxruntime alone (dim 512, depth 4), so without
# this cap validation's memory, linear in max_seq_len, would be three times what one sequence needs.
MAX_CHECK_TOKENS = 65536

Progress = Callable[[int, int, str], None]


@dataclass
class ShapeCheck:
    batch: int
    length: int
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    passed: bool = False
    error: str | None = None
    case: str = ""


@dataclass
class ValidationReport:
    artifact: str
    reference: str
    tolerance: Tolerance
    rows: list[ShapeCheck] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    expected_config: dict | None = field(default=None, repr=False)  # what the artifact's metadata must say

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def worst(self) -> tuple[float, float]:
        done = [r for r in self.rows if r.error is None]
        return (max((r.max_abs for r in done), default=float("nan")), max((r.max_rel for r in done), default=float("nan")))

    def to_dict(self) -> dict:
        return {
            "artifact": self.artifact,
            "reference": self.reference,
            "tolerance": asdict(self.tolerance),
            "ok": self.ok,
            "rows": [asdict(r) for r in self.rows],
            "failures": self.failures,
        }


def default_shapes(max_seq_len: int, batches: Sequence[int] = DEFAULT_BATCHES, lengths: Sequence[int] = DEFAULT_LENGTHS) -> list[tuple[int, int]]:
    """(batch, length) pairs: the given lengths that fit, plus the maximum length, at every batch size while
    batch x length <= MAX_CHECK_TOKENS (every length at the smallest batch)."""
    picked = sorted({n for n in lengths if 1 <= n <= max_seq_len} | {max_seq_len})
    smallest = min(batches)
    return [(b, n) for b in batches for n in picked if b == smallest or b * n <= MAX_CHECK_TOKENS]


def eager_reference(model: GatedLM) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A float32 eager forward to compare against, and its name."""
    try:
        upstream = model.config.upstream()
    except ImportError:
        return model.with_conv("fft"), "gss_export eager (torch.fft form; upstream package not installed)"
    upstream.load_state_dict(model.state_dict(), strict=True)
    return upstream.eval(), f"gated-state-spaces-pytorch {model.config.upstream_class} eager (upstream)"


def compare(
    run: Callable[[np.ndarray], np.ndarray],
    model: GatedLM,
    shapes: Sequence[tuple[int, int]],
    tolerance: Tolerance,
    report: ValidationReport,
    on_progress: Progress | None = None,
) -> ValidationReport:
    """Values (and output shapes) of `run` against eager at each (batch, length)."""
    reference, report.reference = eager_reference(model)
    rng = np.random.default_rng(0)
    num_tokens = model.config.num_tokens
    for i, (b, n) in enumerate(shapes):
        if on_progress:
            on_progress(i, len(shapes), f"batch {b}, length {n}")
        ids = rng.integers(0, num_tokens, size=(b, n), dtype=np.int64)
        row = ShapeCheck(batch=b, length=n)
        report.rows.append(row)
        # the reference first, one row at a time: its peak then never meets the artifact's (whose memory
        # arena keeps its own), and it does not grow with the batch
        wants = [eager_row(reference, ids[r : r + 1]) for r in range(b)]
        try:
            got = np.asarray(run(ids))
        except Exception as e:  # an artifact that fails to run is a finding, not a crash
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            report.failures.append(f"batch {b}, length {n}: the artifact failed to run: {row.error}")
            continue
        if got.shape != (b, n, num_tokens):
            row.error = f"shape {got.shape}"
            report.failures.append(f"batch {b}, length {n}: logits shape {got.shape}, expected {(b, n, num_tokens)}")
            continue
        row.max_abs, ref_max, finite = 0.0, 0.0, True
        for r, want in enumerate(wants):
            diff = np.abs(got[r] - want)
            finite = finite and bool(np.isfinite(diff).all())
            row.max_abs = max(row.max_abs, float(diff.max()))
            ref_max = max(ref_max, float(np.abs(want).max()))
        del wants, got
        row.max_abs = row.max_abs if finite else float("nan")
        row.max_rel = row.max_abs / max(ref_max, 1e-30)
        row.passed = finite and tolerance.passes(row.max_abs, ref_max)
        if not row.passed:
            report.failures.append(
                f"batch {b}, length {n}: max abs error {row.max_abs:.3g}, rel {row.max_rel:.3g} "
                f"exceeds rtol {tolerance.rtol:g} / atol {tolerance.atol:g}"
            )
    if on_progress:
        on_progress(len(shapes), len(shapes), "done")
    return report


def eager_row(reference, ids: np.ndarray) -> np.ndarray:
    """The reference's logits (n, num_tokens) for one row ids (1, n)."""
    with torch.no_grad():
        return reference(torch.from_numpy(np.ascontiguousarray(ids, np.int64)))[0].numpy()


def onnx_forward(path: Path, report: ValidationReport) -> Callable[[np.ndarray], np.ndarray] | None:
    """`path` opened with onnxruntime's CPU provider, after checking its input and output names, types and axes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expect = [("input", inputs, "input_ids", "tensor(int64)", 2), ("output", outputs, "logits", "tensor(float)", 3)]
    for kind, values, name, dtype, rank in expect:
        if [v.name for v in values] != [name]:
            report.failures.append(f"{kind} names {[v.name for v in values]}, expected [{name!r}]")
            continue
        (value,) = values
        if value.type != dtype:
            report.failures.append(f"{kind} {name!r} has type {value.type}, expected {dtype}")
        if len(value.shape) != rank or not all(isinstance(d, str) for d in value.shape[:2]):
            report.failures.append(f"{kind} {name!r} has shape {value.shape}: expected rank {rank} with symbolic batch and sequence")
    stored = json.loads(session.get_modelmeta().custom_metadata_map.get("gss_export.model", "null"))
    if stored != report.expected_config:
        report.failures.append(f"metadata gss_export.model is {stored}, expected {report.expected_config}")
    if report.failures:  # names are wrong: values would only repeat the finding
        return None
    return lambda ids: session.run(["logits"], {"input_ids": ids})[0]


def validate_forward(target, path: Path, model: GatedLM, shapes, tolerance: Tolerance, on_progress: Progress | None = None) -> ValidationReport:
    """The artifact's forward (`target.forward`: interface first) against eager at each shape."""
    report = ValidationReport(artifact=str(path), reference="", tolerance=tolerance, expected_config=model.config.to_dict())
    run = target.forward(path, report)
    if run is None:
        return report
    return compare(run, model, shapes, tolerance, report, on_progress)


def torch_runner(forward) -> Callable[[np.ndarray], np.ndarray]:
    """input_ids (b, n) numpy -> logits numpy through a torch callable."""

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return forward(torch.from_numpy(ids)).numpy()

    return run


@dataclass(frozen=True)
class DecoderCase:
    """A prompt batch (ragged: one length per row), optionally `more` tokens fed in one call after it,
    then `steps` single tokens. whole: the graph the prompt and `more` go through (True: prefill,
    False: the step graph, None: the runtime's own choice by length)."""

    name: str
    lengths: tuple[int, ...]
    steps: int
    more: int = 0
    whole: bool | None = None


def decoder_cases(max_seq_len: int) -> list[DecoderCase]:
    """One token, a batch crossing 128 through the step graph, a ragged batch and a continuation through
    the prefill graph, the last positions. Each case is cut to fit max_seq_len."""
    m = max_seq_len
    cases = [
        DecoderCase("1 token + steps", (1,), 8),
        DecoderCase("batch 3 across 128 (step graph)", (100, 100, 100), 30, whole=False),
        DecoderCase("ragged 7/65/129 (prefill)", (7, 65, 129), 5, whole=True),
        DecoderCase("prefill + continuation", (150, 40), 3, more=150, whole=True),
    ]
    fitted = []
    for c in cases:
        lengths = tuple(min(n, m - 1) for n in c.lengths)
        more = min(c.more, m - 1 - max(lengths))
        steps = min(c.steps, m - max(lengths) - more)
        if steps >= 1:
            fitted.append(DecoderCase(c.name, lengths, steps, more, c.whole))
    last = (m - 3, 2) if 2 * (m - 3) <= MAX_CHECK_TOKENS else (m - 3,)  # ragged at the maximum while it fits the cap
    return fitted + [DecoderCase("up to max_seq_len", last, 3)]


def validate_decoder(decoder, artifact: str, model: GatedLM, tolerance: Tolerance, on_progress: Progress | None = None) -> ValidationReport:
    """Incremental decoding against eager full forwards at every position.

    `decoder` has empty_state(pads), feed(ids (b, t), state, whole) and step(tokens (b,), state), each
    returning numpy logits and the new state: `gss_runtime.Decoder` over decoder.onnx and prefill.onnx,
    or `targets.torch_decoder.TorchDecoder` over the step and prefill of model.pt or model.pt2. Each case
    prefills a (ragged) prompt batch, may continue it, then feeds one token per step; each row's logits
    at all its positions must equal the eager forward of that row's whole sequence. Memory stays linear
    in the length: prompts at max_seq_len go through the prefill graph, the reference runs row by row.
    """
    reference, name = eager_reference(model)
    report = ValidationReport(artifact=artifact, reference=name, tolerance=tolerance)
    rng = np.random.default_rng(1)
    # a program with a batch bound (ExecuTorch's) is checked on the cases within it
    cases = [c for c in decoder_cases(model.config.max_seq_len) if len(c.lengths) <= getattr(decoder, "max_batch", len(c.lengths))]
    for i, case in enumerate(cases):
        if on_progress:
            on_progress(i, len(cases), case.name)
        lengths, longest = case.lengths, max(case.lengths)
        seqs = [rng.integers(0, model.config.num_tokens, size=n + case.more + case.steps) for n in lengths]
        row = ShapeCheck(batch=len(lengths), length=longest + case.more + case.steps, case=case.name)
        report.rows.append(row)
        wants = [eager_row(reference, seq[None]) for seq in seqs]  # first: see `compare`
        try:
            padded = np.zeros((len(seqs), longest), np.int64)
            for r, (seq, n) in enumerate(zip(seqs, lengths)):
                padded[r, longest - n :] = seq[:n]
            logits, state = decoder.feed(padded, decoder.empty_state([longest - n for n in lengths]), case.whole)
            got = [[logits[r, longest - n :]] for r, n in enumerate(lengths)]
            if case.more:
                logits, state = decoder.feed(np.stack([seq[n : n + case.more] for seq, n in zip(seqs, lengths)]), state, case.whole)
                for r in range(len(seqs)):
                    got[r].append(logits[r])
            for t in range(case.steps):
                step_logits, state = decoder.step(np.array([seq[n + case.more + t] for seq, n in zip(seqs, lengths)]), state)
                for r in range(len(seqs)):
                    got[r].append(step_logits[r][None])
        except Exception as e:
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            report.failures.append(f"decoder case {case.name!r} failed to run: {row.error}")
            continue
        del state, logits
        worst_abs, ref_max = 0.0, 0.0
        for want, rows in zip(wants, got):
            worst_abs = max(worst_abs, float(np.abs(np.concatenate(rows) - want).max()))
            ref_max = max(ref_max, float(np.abs(want).max()))
        del wants, got
        row.max_abs, row.max_rel = worst_abs, worst_abs / max(ref_max, 1e-30)
        row.passed = tolerance.passes(worst_abs, ref_max)
        if not row.passed:
            report.failures.append(f"decoder case {case.name!r}: max abs error {worst_abs:.3g}, rel {row.max_rel:.3g} exceeds tolerance")
    if on_progress:
        on_progress(len(cases), len(cases), "done")
    return report
