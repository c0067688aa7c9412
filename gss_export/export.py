"""One export end to end: build the artifact, validate it, publish it with its config.json.

The library returns values and raises `GSSExportError`s; it prints nothing (the CLI does).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from . import DEFAULT_OPSET
from .artifacts import CONFIG_NAME, staged_output, write_json
from .errors import GSSExportError, ValidationFailed
from .families import GatedLM, family_of
from .targets import FORMATS, TARGETS
from .targets.decoder_io import PAST_LAYOUT
from .targets.onnx import INPUTS, outputs_spec
from .tolerances import Tolerance, tolerance_for
from .validation import ValidationReport, default_shapes, validate_decoder, validate_forward

if TYPE_CHECKING:  # the request brings its own saving and checking: export never imports the variants
    from .backend_check import OpenVinoCheck, OpenVinoRequest
    from .variants.request import VariantRequest

# (stage, done, total, label): stage is "export", "validate", "decoder" (or a variant's checks), then "publish"
StageProgress = Callable[[str, int, int, str], None]


@dataclass
class ExportResult:
    out_dir: Path
    files: list[str]
    settings: dict
    report: ValidationReport | None
    decoder_report: ValidationReport | None = None
    notes: list[str] = field(default_factory=list)
    openvino: OpenVinoCheck | None = None  # the export checked on OpenVINO (openvino=...)


def export_model(
    model: GatedLM,
    fmt: str,
    out_dir: str | Path,
    *,
    conv: str = "auto",
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    tolerance: Tolerance | None = None,
    shapes: Sequence[tuple[int, int]] | None = None,
    external_data: bool | None = None,
    decoder: bool = True,
    variant: VariantRequest | None = None,
    source: dict | None = None,
    on_progress: StageProgress | None = None,
    tokenizer: str | Path | None = None,
    openvino: OpenVinoRequest | None = None,
    max_batch: int | None = None,
) -> ExportResult:
    """Export `model` as `fmt` into `out_dir`; raises ValidationFailed (with `.report`) on a mismatch.

    ONNX also writes the decoder with state (`decoder.onnx`) unless `decoder=False`.
    Nothing in `out_dir` changes unless the export and its validation both succeed.
    `variant` (ONNX only) writes fp16 or int8 files instead, checked on held-out text (quality reports).
    `tokenizer`: a Hugging Face tokenizer.json, or a folder holding it with tokenizer_config.json and
    special_tokens_map.json: copied beside the model and recorded in config.json (refused when its
    vocabulary does not fit num_tokens).
    `max_batch` (ExecuTorch only): the largest batch the program is planned for (default 4); validation
    checks the shapes within it.
    `openvino` (ONNX, float32): also checked on OpenVINO, f32 against eager (a mismatch fails the export like
    onnxruntime's) and bf16 on held-out text (recorded in config.json's `backends`, which the runtimes read).
    """
    progress = on_progress or (lambda *_: None)
    tokenizer_files = _tokenizer(tokenizer, model.config.num_tokens) if tokenizer is not None else None
    if variant is not None:
        variant.prepare(fmt, model, validate)  # bad requests fail before anything is built
    if openvino is not None:
        openvino.prepare(fmt, model, validate, variant)
    tolerance = tolerance or tolerance_for(fmt)
    shapes = list(shapes) if shapes is not None else default_shapes(model.config.max_seq_len)
    config = model.config.to_dict()
    report = decoder_report = checked = None
    if fmt not in TARGETS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    target = TARGETS[fmt]
    metadata = {"model": config, "inputs": INPUTS, "outputs": outputs_spec(model.config.num_tokens)}
    with staged_output(out_dir) as staging:
        progress("export", 0, 1, f"building {fmt}")
        if max_batch is not None and fmt != "executorch":
            raise GSSExportError("--max-batch bounds an ExecuTorch program (--format executorch); other formats take any batch")
        settings = target.settings(model, conv=conv, opset=opset, **({"max_batch": max_batch} if max_batch is not None else {}))
        if "max_batch" in settings:
            shapes = [(b, n) for b, n in shapes if b <= settings["max_batch"]]
        # every runtime sends a call of more new tokens than this through prefill (the family's measured crossover)
        settings["prefill_above"] = family_of(model).prefill_above
        if model.config.state == "append":  # every runtime refuses an appended past of another layout
            settings["past_layout"] = PAST_LAYOUT
        path = target.build(model, staging, settings, metadata, conv=conv, opset=opset, external_data=external_data,
                            decoder=decoder, variant=variant, progress=progress)
        progress("export", 1, 1, f"built {path.name}")

        if validate and variant is not None:
            report, decoder_report = variant.check(staging, Path(out_dir), model, settings, decoder, progress)
        elif validate:
            report = validate_forward(target, path, model, shapes, tolerance, lambda i, n, label: progress("validate", i, n, label))
            report.artifact = str(Path(out_dir) / path.name)  # where it will live, not the staging folder
            incremental = target.decoder(staging, path, model, decoder) if report.ok else None
            if incremental is not None:
                stepper, name = incremental
                decoder_report = validate_decoder(stepper, str(Path(out_dir) / name), model, tolerance,
                                                  lambda i, n, label: progress("decoder", i, n, label))
            _raise_on_failure(report, decoder_report, out_dir=out_dir)
            if openvino is not None:
                from .backend_check import check_openvino

                checked = check_openvino(staging, Path(out_dir), model, shapes, tolerance, decoder, openvino.heldout,
                                         openvino.threshold, openvino.window, progress)
                _raise_on_failure(checked.forward, checked.decoder, out_dir=out_dir, where=" on OpenVINO f32")
        if tokenizer_files is not None:
            for name, path in tokenizer_files.files.items():
                shutil.copyfile(path, staging / name)
        write_json(staging / CONFIG_NAME, {
            **metadata,
            "tokenizer": tokenizer_files.record() if tokenizer_files is not None else None,
            "export": settings,
            "source": source or {},
            "validation": report.to_dict() if report else None,
            "decoder_validation": decoder_report.to_dict() if decoder_report else None,
            "backends": {"openvino": checked.record()} if checked is not None else {},
        })
        files = sorted(p.name for p in staging.iterdir())
        progress("publish", 0, 1, f"writing {out_dir}")
    return ExportResult(out_dir=Path(out_dir), files=files, settings=settings, report=report, decoder_report=decoder_report,
                        openvino=checked)


def _raise_on_failure(*reports: ValidationReport | None, out_dir, where: str = "") -> None:
    for checked in reports:
        if checked is not None and not checked.ok:
            raise ValidationFailed(
                f"{Path(checked.artifact.removesuffix(where)).name}{where} disagrees with eager PyTorch in {len(checked.failures)} "
                f"check(s); nothing was written to {out_dir}", report=checked,
            )


def _tokenizer(path: str | Path, num_tokens: int):
    """The tokenizer files, read and checked against the model before anything is built."""
    from gss_runtime.tokenizer import TokenizerError, read_tokenizer

    try:
        files = read_tokenizer(path)
        files.check_fits(num_tokens)
    except TokenizerError as e:
        raise GSSExportError(str(e)) from None
    return files
