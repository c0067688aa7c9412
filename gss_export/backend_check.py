"""An ONNX export checked on a second backend, OpenVINO (`gss-export --openvino`).

- f32: `model.onnx` at the validation shapes and the decoder (`decoder.onnx`, `prefill.onnx`) at the
  decoder cases, against eager with the onnx tolerance: the same checks onnxruntime passes first.
- bf16 (OpenVINO's CPU default wherever the CPU has bf16 arithmetic): top-1 agreement and mean KL
  against float32 eager on held-out text, as fp16 and int8 exports are judged, for `model.onnx` and
  `decoder.onnx`, against `tolerances.QUALITY["bf16"]`.

The outcome goes into config.json as `backends.openvino`; gss-run and gss-serve offer `--precision
bf16` only where its record says it passed, and otherwise say why.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import GSSExportError
from .tolerances import QualityThreshold, Tolerance
from .validation import ValidationReport, validate_decoder, validate_forward
from .variants import quality

if TYPE_CHECKING:  # annotations only
    from .families import GatedLM

BACKEND = "openvino"
Progress = Callable[[str, int, int, str], None]


def require_openvino() -> None:
    """Fails before anything is built when OpenVINO is missing."""
    from gss_runtime.backends import openvino

    if openvino.ov is None:
        raise GSSExportError('--openvino needs OpenVINO: pip install "gss-runtime[openvino]" (or pip install openvino)')


@dataclass
class OpenVinoForward:
    """A `validate_forward` target: model.onnx on OpenVINO at `precision` (the interface checked first)."""

    precision: str = "f32"

    def forward(self, path: Path, report: ValidationReport):
        from gss_runtime.backends import open_graph

        graph = open_graph(path, BACKEND, precision=self.precision)
        if graph.input_names != ["input_ids"] or graph.output_names[:1] != ["logits"]:
            report.failures.append(f"OpenVINO reads inputs {graph.input_names} and outputs {graph.output_names}, "
                                   "expected ['input_ids'] and ['logits']")
            return None
        return lambda ids: graph.run({"input_ids": ids})[0]


@dataclass
class OpenVinoCheck:
    """Everything `gss-export --openvino` measured: f32 parity reports and bf16 quality (or why not)."""

    forward: ValidationReport
    decoder: ValidationReport | None
    bf16: list  # QualityReport of model.onnx, then decoder.onnx where exported
    bf16_skipped: str | None = None  # why bf16 was not measured (a CPU without bf16 arithmetic)

    @property
    def bf16_ok(self) -> bool:
        return self.bf16_skipped is None and all(r.ok for r in self.bf16)

    def record(self) -> dict:
        """config.json's `backends.openvino`."""
        from gss_runtime.backends import openvino

        failures = [f"{_file(r)}: {f}" for r in self.bf16 for f in r.failures]
        if self.bf16_skipped:
            failures = [self.bf16_skipped]
        worst = lambda report: None if report is None else report.worst[1]  # noqa: E731
        return {
            "version": openvino.version(), "machine": platform.machine(),
            "f32": {"ok": self.forward.ok and (self.decoder is None or self.decoder.ok), "max_rel": worst(self.forward),
                    "decoder_max_rel": worst(self.decoder), "validation": self.forward.to_dict(),
                    "decoder_validation": self.decoder.to_dict() if self.decoder else None},
            "bf16": {"ok": self.bf16_ok, "failures": failures,
                     "quality": {_file(r): r.to_dict() for r in self.bf16}},
        }


BF16 = " on OpenVINO bf16"  # what a bf16 quality report's artifact ends with, after its path


def _file(report) -> str:
    """The file a bf16 report is about."""
    return Path(report.artifact.removesuffix(BF16)).name


def check_openvino(staging: Path, out_dir: Path, model: GatedLM, shapes, tolerance: Tolerance, decoder: bool,
                   heldout: quality.HeldOut, threshold: QualityThreshold, window: int, progress: Progress) -> OpenVinoCheck:
    """The staged export on OpenVINO: f32 against eager, then bf16 on held-out text (see the module's docstring)."""
    from gss_runtime.backends import openvino
    from gss_runtime.decoder import Decoder

    forward = validate_forward(OpenVinoForward("f32"), staging / "model.onnx", model, shapes, tolerance,
                               lambda i, n, label: progress("openvino", i, n, label))
    forward.artifact = f"{out_dir / 'model.onnx'} on OpenVINO f32"
    decoder_report = None
    if decoder and forward.ok:
        decoder_report = validate_decoder(Decoder(staging, backend=BACKEND), f"{out_dir / 'decoder.onnx'} on OpenVINO f32", model,
                                          tolerance, lambda i, n, label: progress("openvino decoder", i, n, label))
    if not openvino.has_bf16():
        return OpenVinoCheck(forward, decoder_report, [], "this CPU has no bf16 arithmetic (OpenVINO finds neither AMX nor "
                             "AVX-512 BF16), so bf16 was not measured")
    batch = quality.windows(heldout.ids, model.config.max_seq_len, length=window)
    want, reference = quality.eager_logits(model, batch)
    runners = [("model.onnx", quality.model_runner(staging / "model.onnx", BACKEND, "bf16"))]
    if decoder:
        runners.append(("decoder.onnx", quality.decoder_runner(staging, BACKEND, "bf16")))
    reports = []
    for name, run in runners:
        size = (staging / name).stat().st_size  # the same file as float32's: OpenVINO converts while compiling
        report = quality.QualityReport(artifact=f"{out_dir / name}{BF16}", reference=reference, threshold=threshold,
                                       text=heldout.source, bytes=size, fp32_bytes=size)
        reports.append(quality.measure(run, want, batch, report, lambda i, n, label: progress("openvino bf16", i, n, label)))
    return OpenVinoCheck(forward, decoder_report, reports)


@dataclass
class OpenVinoRequest:
    """`gss-export --openvino`: held-out text for bf16 (None: the example corpus's), its bar and window length."""

    heldout: quality.HeldOut | None
    threshold: QualityThreshold
    window: int = quality.WINDOW

    def prepare(self, fmt: str, model: GatedLM, validate: bool, variant) -> None:
        """Bad requests fail before anything is built."""
        if fmt != "onnx":
            raise GSSExportError(f"--openvino checks ONNX exports (OpenVINO reads model.onnx); this export is {fmt}")
        if not validate:
            raise GSSExportError("--openvino is a check on OpenVINO: it cannot be combined with --no-validate")
        if variant is not None:
            raise GSSExportError("--openvino checks the float32 export; fp16 and int8 files are onnxruntime's")
        require_openvino()
        if self.heldout is None:
            self.heldout = quality.heldout(model.config.num_tokens)  # refuses a model the example text does not fit
