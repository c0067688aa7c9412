"""The fp16 / int8 variants inside an ONNX export: what is asked for, how it is written, how it is checked.

`export.export_model` builds the float32 graphs as usual; with a `VariantRequest` the ONNX target
hands each one to the request, which writes it as its variant instead (`VariantRequest.save`, built by
`build`), and validation is the request's quality check on held-out text (`VariantRequest.check`,
`quality`) in place of the float32 tolerance check, which cannot hold at reduced precision. The request
carries that behaviour into the export, so neither `export` nor `targets` imports this package.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import onnx

from ..errors import GSSExportError, ValidationFailed
from ..targets import TARGETS
from ..tolerances import QualityThreshold, quality_for
from . import quality
from .build import INT8_ACTIVATIONS, VARIANTS, save_variant
from .int8_products import resolve_target

if TYPE_CHECKING:  # annotations only
    from ..families import GatedLM

DTYPES = {"fp16": "float16", "int8": "int8"}


@dataclass
class VariantRequest:
    """kind: "fp16" or "int8"; threshold: defaults from the tolerance table; heldout: None for the
    built-in held-out text (byte-level models); window: held-out window length (capped at max_seq_len)."""

    kind: str
    threshold: QualityThreshold | None = None
    heldout: quality.HeldOut | None = None
    window: int = quality.WINDOW
    int8_activations: str = "auto"
    int8_cpu: str = "auto"  # the CPU the int8 weights are ranged for (`int8_products.resolve_target`)
    options: dict = field(default_factory=dict, init=False)

    def prepare(self, fmt: str, model: GatedLM, validate: bool = True) -> None:
        """Check the request against the export and fill in defaults; raises GSSExportError (exit 2).

        The held-out text is needed only to validate (a non-byte-level model has no default)."""
        if self.kind not in VARIANTS:
            raise GSSExportError(f"unknown variant {self.kind!r}; choose one of {', '.join(VARIANTS)}")
        if not getattr(TARGETS.get(fmt), "variants", False):
            raise GSSExportError(f"--dtype fp16 and --quantize int8 make ONNX variants; {fmt} exports are float32: use --format onnx")
        if self.int8_activations not in INT8_ACTIVATIONS:
            raise GSSExportError(f"--int8-activations must be one of {', '.join(INT8_ACTIVATIONS)}, got {self.int8_activations!r}")
        if self.window < 2:
            raise GSSExportError(f"--heldout-length must be at least 2, got {self.window}")
        self.threshold = self.threshold or quality_for(self.kind)
        if validate and self.heldout is None:
            self.heldout = quality.heldout(model.config.num_tokens)
        # the CPU target is resolved once per export, so every file is ranged for the same CPU
        self.options = {"activations": self.int8_activations, "cpu": resolve_target(self.int8_cpu)} if self.kind == "int8" else {}

    def settings(self) -> dict:
        """What config.json's export settings say about the variant before it is built."""
        return {"dtype": DTYPES[self.kind], "variant": {"kind": self.kind, **self.options, "files": {}}}

    def save(self, proto: onnx.ModelProto, path: Path, external_data: bool | None, settings: dict) -> None:
        """Write the float32 `proto` to `path` as this variant; its record goes into `settings`."""
        settings["variant"]["files"][path.name] = save_variant(proto, self.kind, path, external_data, **self.options)

    def check(self, staging: Path, out_dir: Path, model: GatedLM, settings: dict, decoder: bool,
              progress: Callable[[str, int, int, str], None]):
        """(model report, decoder report or None): quality of the staged files; raises ValidationFailed below threshold."""
        batch = quality.windows(self.heldout.ids, model.config.max_seq_len, length=self.window)
        want, reference = quality.eager_logits(model, batch)
        reports = []
        for name, runner in (("model.onnx", quality.model_runner), ("decoder.onnx", quality.decoder_runner)):
            if name == "decoder.onnx" and not decoder:
                reports.append(None)
                continue
            record = settings["variant"]["files"][name]
            report = quality.QualityReport(
                artifact=str(out_dir / name), reference=reference, threshold=self.threshold, text=self.heldout.source,
                bytes=record["bytes"], fp32_bytes=record["fp32_bytes"],
            )
            stage = "quality" if name == "model.onnx" else "decoder quality"
            reports.append(quality.measure(runner(staging / name), want, batch, report, lambda i, n, label, s=stage: progress(s, i, n, label)))
        for report in reports:
            if report is not None and not report.ok:
                raise ValidationFailed(
                    f"{Path(report.artifact).name} ({self.kind}) is too far from float32 eager on held-out text: "
                    f"{'; '.join(report.failures)}; nothing was written to {out_dir}", report=report,
                )
        return reports[0], reports[1]


def describe(settings: dict) -> str:
    """One line per file: what the variant computes in reduced precision and what it kept in float32."""
    lines = []
    for name, rec in settings["variant"]["files"].items():
        counts = lambda ops: ", ".join(f"{op} {n}" for op, n in sorted(ops.items())) or "none"  # noqa: E731
        if rec["variant"] == "fp16":
            kept = rec["fp32_ops"]
            lines.append(
                f"{name}: float16 weights ({rec['weights_fp16']}); float16 compute: {counts(rec['fp16_ops'])}; "
                f"float32, no fp16 kernel in onnxruntime's CPU provider: {counts(kept['no_fp16_kernel'])}; "
                f"float32, convolution and gating/residual arithmetic: {sum(kept['sequence_mixing'].values())} nodes"
            )
        else:
            cpu = rec["cpu"]
            lines.append(
                f"{name}: int8 for {cpu['target']} ({cpu['chosen_by']}); activations scaled per tensor in "
                f"{rec['per_tensor_activations']['MatMul']} products, per row in {rec['per_row_activations']['MatMul']}; "
                f"float32: {rec['float_weight_products']} narrow products and the convolution"
            )
    return "\n".join(lines)
