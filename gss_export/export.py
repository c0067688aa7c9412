"""One export end to end: build the artifact, validate it, publish it with its config.json.

The library returns values and raises `GSSExportError`s; it prints nothing (the CLI does).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import aoti_export, decoder_export, onnx_export, pt2_export, torchscript_export
from .artifacts import CONFIG_NAME, staged_output, write_json
from .conv_forms import SWITCH_FORMS, resolve_form
from .errors import ValidationFailed
from .model import GatedDsConvLM
from .tolerances import Tolerance, tolerance_for
from .variant_export import VariantRequest, check as check_variant, save as save_onnx_file
from .torch_decoder import TorchDecoder
from .validation import (
    ValidationReport, default_shapes, validate_aoti, validate_decoder, validate_onnx, validate_pt2, validate_torchscript,
)

FORMATS = ("onnx", "torchscript", "pt2", "aoti")

# (stage, done, total, label): stage is "export" or "validate"
StageProgress = Callable[[str, int, int, str], None]


@dataclass
class ExportResult:
    out_dir: Path
    files: list[str]
    settings: dict
    report: ValidationReport | None
    decoder_report: ValidationReport | None = None
    notes: list[str] = field(default_factory=list)


def _incremental_decoder(fmt: str, staging: Path, path: Path, decoder: bool, model: GatedDsConvLM):
    """(what decodes this export incrementally, the file it lives in), or None."""
    if fmt == "onnx":
        if not decoder:
            return None
        from gss_runtime.decoder import Decoder

        return Decoder(staging, provider="cpu"), decoder_export.FILE
    load = {
        "torchscript": lambda name: getattr(torchscript_export.load_torchscript(path), name),
        "pt2": lambda name: pt2_export.load_pt2_program(path, name),
        "aoti": lambda name: aoti_export.load_aoti(path, name),
    }[fmt]
    return TorchDecoder(load("step"), model.config, prefill=load("prefill")), f"{path.name} (step, prefill)"


def export_model(
    model: GatedDsConvLM,
    fmt: str,
    out_dir: str | Path,
    *,
    conv: str = "auto",
    opset: int = onnx_export.DEFAULT_OPSET,
    validate: bool = True,
    tolerance: Tolerance | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
    external_data: bool | None = None,
    decoder: bool = True,
    variant: VariantRequest | None = None,
    source: dict | None = None,
    on_progress: StageProgress | None = None,
) -> ExportResult:
    """Export `model` as `fmt` into `out_dir`; raises ValidationFailed (with `.report`) on a mismatch.

    ONNX also writes the decoder with state (`decoder.onnx`) unless `decoder=False`.
    Nothing in `out_dir` changes unless the export and its validation both succeed.
    `variant` (ONNX only) writes fp16 or int8 files instead, checked on held-out text (quality reports).
    """
    progress = on_progress or (lambda *_: None)
    if variant is not None:
        variant.prepare(fmt, model, validate)  # bad requests fail before anything is built
    tolerance = tolerance or tolerance_for(fmt)
    shapes = list(shapes) if shapes is not None else default_shapes(model.config.max_seq_len)
    config = model.config.to_dict()
    report = decoder_report = None
    with staged_output(out_dir) as staging:
        progress("export", 0, 1, f"building {fmt}")
        if fmt == "onnx":
            if variant is not None and resolve_form(conv, "onnx") == "switch":
                # onnxruntime's float16 converter and quantizer rewrite the top-level graph, not If branches
                conv = SWITCH_FORMS[1]
            settings = onnx_export.export_settings(model, conv=conv, opset=opset)
            if variant is not None:
                settings.update(variant.settings())
            proto = onnx_export.build_onnx(model, conv=conv, opset=opset)
            onnx_export.annotate(proto, {
                "model": config, "export": settings,
                "inputs": onnx_export.INPUTS, "outputs": onnx_export.outputs_spec(model.config.num_tokens),
            })
            path = staging / settings["file"]
            save_onnx_file(proto, path, external_data, variant, settings)
            validator = validate_onnx
            if decoder:
                progress("export", 0, 1, "building the decoder with state")
                io = decoder_export.decoder_io(model)
                for name, prefill, how in ((decoder_export.FILE, False, "direct over the past"),
                                           (decoder_export.PREFILL_FILE, True, f"{decoder_export.PREFILL_FORM} over all slots")):
                    progress("export", 0, 1, f"building {name}")
                    graph = decoder_export.build_decoder(model, opset=opset, prefill=prefill)
                    onnx_export.annotate(graph, {"model": config, "export": {**settings, "file": name, "conv": how}, **io})
                    save_onnx_file(graph, staging / name, external_data, variant, settings)
                settings["decoder"] = {"file": decoder_export.FILE, **io}
                settings["prefill"] = {"file": decoder_export.PREFILL_FILE, "conv": decoder_export.PREFILL_FORM,
                                       "use_above_new_tokens": decoder_export.PREFILL_ABOVE}
        elif fmt == "torchscript":
            settings = torchscript_export.export_settings(model, conv=conv)
            path = staging / settings["file"]
            torchscript_export.save_torchscript(
                torchscript_export.build_torchscript(model, conv=conv), path, {"model": config, "export": settings}
            )
            validator = validate_torchscript
        elif fmt in ("pt2", "aoti"):
            settings = pt2_export.export_settings(model, conv=conv, fmt=fmt)
            path = staging / settings["file"]
            metadata = {"model": config, "export": settings}
            if fmt == "pt2":
                pt2_export.save_pt2(pt2_export.build_programs(model, conv=conv), path, metadata)
            else:
                aoti_export.build_and_save_aoti(model, path, metadata, conv=conv)
            validator = validate_pt2 if fmt == "pt2" else validate_aoti
        else:
            raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        progress("export", 1, 1, f"built {path.name}")

        if validate and variant is not None:
            report, decoder_report = check_variant(staging, Path(out_dir), model, variant, settings, decoder, progress)
        elif validate:
            report = validator(path, model, shapes, tolerance, lambda i, n, label: progress("validate", i, n, label))
            report.artifact = str(Path(out_dir) / path.name)  # where it will live, not the staging folder
            incremental = _incremental_decoder(fmt, staging, path, decoder, model) if report.ok else None
            if incremental is not None:
                stepper, name = incremental
                decoder_report = validate_decoder(stepper, str(Path(out_dir) / name), model, tolerance,
                                                  lambda i, n, label: progress("decoder", i, n, label))
            for checked in (report, decoder_report):
                if checked is not None and not checked.ok:
                    raise ValidationFailed(
                        f"{Path(checked.artifact).name} disagrees with eager PyTorch in {len(checked.failures)} check(s); "
                        f"nothing was written to {out_dir}", report=checked,
                    )
        write_json(staging / CONFIG_NAME, {
            "model": config,
            "export": settings,
            "inputs": onnx_export.INPUTS,
            "outputs": onnx_export.outputs_spec(model.config.num_tokens),
            "source": source or {},
            "validation": report.to_dict() if report else None,
            "decoder_validation": decoder_report.to_dict() if decoder_report else None,
        })
        files = sorted(p.name for p in staging.iterdir())
    return ExportResult(out_dir=Path(out_dir), files=files, settings=settings, report=report, decoder_report=decoder_report)
