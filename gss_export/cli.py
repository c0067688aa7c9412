"""`gss-export`: a thin typer layer over `gss_export.export.export_model`."""
from __future__ import annotations

import math
import os
import signal
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from gss_runtime.cli_support import Interrupted, guarded

from . import DEFAULT_OPSET
from .errors import GSSExportError, ValidationFailed
from .targets import FORMATS

console = Console(stderr=True)
out = Console()


# the choices come from the table of export targets
Format = Enum("Format", {name: name for name in FORMATS}, type=str)


class DType(str, Enum):
    fp32 = "fp32"
    fp16 = "fp16"


class Quantize(str, Enum):
    int8 = "int8"


class Int8Activations(str, Enum):
    auto = "auto"
    per_row = "per-row"
    per_tensor = "per-tensor"


class Int8Cpu(str, Enum):
    auto = "auto"
    vnni = "vnni"
    avx2 = "avx2"


class Conv(str, Enum):
    auto = "auto"
    direct = "direct"
    fft = "fft"
    monarch = "monarch"


def _int_list(text: Optional[str], what: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{what} must be positive integers, got {text!r}")
    return values


def export(
    checkpoint: Path = typer.Argument(..., help="state dict (.pt/.pth/.bin/.ckpt) or .safetensors of a GatedDsConvLM, GatedStateSpacesLM or GatedExponentialSmoothingLM"),
    format: Format = typer.Option(Format.onnx, "--format", "-f", help="artifact to produce"),
    output: Path = typer.Option(..., "--output", "-o", help="output folder (created; replaced only by a validated export)"),
    opset: int = typer.Option(DEFAULT_OPSET, help="ONNX opset, 17-23 (20 and later run GELU as one operator)"),
    conv: Conv = typer.Option(Conv.auto, help="convolution form; auto picks the measured fastest for the format"),
    max_seq_len: int = typer.Option(2048, "--max-seq-len", min=1, help="longest sequence the artifact accepts (not stored in checkpoints)"),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="compare the artifact with eager PyTorch"),
    rtol: Optional[float] = typer.Option(None, help="relative tolerance (default from the tolerance table: 1e-4)"),
    atol: Optional[float] = typer.Option(None, help="absolute tolerance (default 0)"),
    batch_sizes: str = typer.Option("1,3", help="batch sizes to validate, e.g. 1,3"),
    lengths: Optional[str] = typer.Option(None, help="lengths to validate (default 1,2,3,7,16,17,64,65,100,127,128,129,1000,1024,1025,8192,8193 up to the maximum, and the maximum)"),
    external_data: Optional[bool] = typer.Option(None, "--external-data/--inline", help="ONNX weights beside the model (default: only when over 1.8 GB)"),
    decoder: bool = typer.Option(True, "--decoder/--no-decoder", help="ONNX: also write decoder.onnx, the decoder with state for generation"),
    lambda_imag_exp: Optional[bool] = typer.Option(None, "--lambda-imag-exp/--no-lambda-imag-exp", help="GatedStateSpacesLM: the checkpoint's dss_kernel_lambda_imag_exp, which shapes cannot tell (default: upstream's, on)"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow pickled objects in the checkpoint (runs code it contains: only for files you trust)"),
    dtype: DType = typer.Option(DType.fp32, "--dtype", help="ONNX: fp16 stores float16 weights and computes float16 where onnxruntime can"),
    quantize: Optional[Quantize] = typer.Option(None, "--quantize", help="ONNX: int8 weights, activations quantized at run time (onnxruntime's tools)"),
    int8_activations: Int8Activations = typer.Option(Int8Activations.auto, "--int8-activations", help="auto: one scale per tensor where that is accurate, per row elsewhere; per-row / per-tensor: one kind everywhere"),
    int8_cpu: Int8Cpu = typer.Option(Int8Cpu.auto, "--int8-cpu", help="int8 weight range for the CPU that will run it: vnni (full), avx2 ([-64, 64], no int16 overflow without VNNI); auto: this machine's"),
    min_top1: Optional[float] = typer.Option(None, "--min-top1", min=0.0, max=1.0, help="fp16/int8 (and --openvino's bf16): least top-1 agreement with float32 eager on held-out text (default 0.99 / 0.95)"),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", min=0.0, help="fp16/int8 (and --openvino's bf16): largest mean KL divergence from float32 eager, nats (default 1e-3 / 0.02)"),
    heldout_text: Optional[Path] = typer.Option(None, "--heldout-text", help="fp16/int8 (and --openvino's bf16): text to check on (byte-level models: any file; others: token ids); default: the example corpus's held-out split"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="a Hugging Face tokenizer.json, or the folder holding it with tokenizer_config.json and special_tokens_map.json: copied into the export, so every runtime takes and gives text"),
    heldout_length: int = typer.Option(512, "--heldout-length", min=2, help="fp16/int8 (and --openvino's bf16): held-out window length (capped at max_seq_len)"),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="ExecuTorch: the largest batch the program is planned for, 2 to 64 (default 4); its working memory grows with it"),
    openvino: bool = typer.Option(False, "--openvino", help="ONNX: also check the export on OpenVINO: f32 against eager like onnxruntime, and bf16 on held-out text (top-1, KL; --min-top1, --max-kl, --heldout-text apply), recorded so gss-run/gss-serve offer --precision bf16 only where it passed"),
) -> None:
    """Export a gated-state-spaces LM checkpoint to ONNX, TorchScript, torch.export or AOTInductor, dynamic in batch and length, validated against eager PyTorch."""
    args = dict(locals())
    _signalled.clear()
    written: list[bool] = []  # set once the export is in place
    try:
        _export(**args, written=written)
    except Interrupted as e:
        state = f"{output} was already written" if written else f"nothing was written to {output}"
        raise Interrupted(e.signum, f"interrupted by {e.signal_name}: {state}") from None


def _export(checkpoint, format, output, opset, conv, max_seq_len, validate, rtol, atol, batch_sizes, lengths, external_data,
            decoder, lambda_imag_exp, trust_pickle, dtype, quantize, int8_activations, int8_cpu, min_top1, max_kl,
            heldout_text, heldout_length, tokenizer, max_batch, openvino, written) -> None:
    from .checkpoint import load_checkpoint
    from .export import export_model
    from .tolerances import tolerance_for
    from .validation import DEFAULT_BATCHES, DEFAULT_LENGTHS, default_shapes

    for flag, value in (("--rtol", rtol), ("--atol", atol), ("--min-top1", min_top1), ("--max-kl", max_kl)):
        # typer's bounds let nan through, and a nan or negative tolerance fails (inf passes) every check
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise GSSExportError(f"{flag} must be a finite number of at least 0, got {value}")
    kind = _variant_kind(dtype, quantize, int8_activations, int8_cpu, min_top1 if not openvino else None,
                         max_kl if not openvino else None, heldout_text if not openvino else None, rtol, atol)
    batches = _int_list(batch_sizes, "--batch-sizes") or list(DEFAULT_BATCHES)
    picked_lengths = _int_list(lengths, "--lengths") or list(DEFAULT_LENGTHS)
    _signal_at("load")
    loaded = load_checkpoint(checkpoint, max_seq_len=max_seq_len, trust_pickle=trust_pickle, dss_kernel_lambda_imag_exp=lambda_imag_exp)
    cfg = loaded.config
    sizes = " ".join(f"{k}={v}" for k, v in cfg.to_dict().items() if k != "family")
    console.print(f"[bold]{checkpoint}[/]: {loaded.family} {sizes}", highlight=False)
    for note in loaded.notes:
        console.print(f"  [dim]{note}[/]")
    variant = None
    if kind is not None:
        from .tolerances import quality_for
        from .variants.quality import heldout
        from .variants.request import VariantRequest

        text = heldout(cfg.num_tokens, heldout_text) if heldout_text is not None else None
        # export_model checks the request (format, options) before it builds anything
        variant = VariantRequest(kind, quality_for(kind, min_top1, max_kl), text, heldout_length, int8_activations.value,
                                 int8_cpu.value)
    openvino_request = None
    if openvino:
        from .backend_check import OpenVinoRequest
        from .tolerances import quality_for
        from .variants.quality import heldout

        text = heldout(cfg.num_tokens, heldout_text) if heldout_text is not None else None
        openvino_request = OpenVinoRequest(text, quality_for("bf16", min_top1, max_kl), heldout_length)

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int, label: str) -> None:
            _signal_at(stage)
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total, description=f"{stage}: {label}")

        try:
            result = export_model(
                loaded.model, format.value, output, conv=conv.value, opset=opset, validate=validate,
                tolerance=tolerance_for(format.value, rtol, atol), shapes=default_shapes(cfg.max_seq_len, batches, picked_lengths),
                external_data=external_data, decoder=decoder, source={"checkpoint": str(checkpoint), "notes": list(loaded.notes)},
                variant=variant, on_progress=on_progress, tokenizer=tokenizer, openvino=openvino_request, max_batch=max_batch,
            )
            written.append(True)
        except ValidationFailed as e:
            bar.stop()
            if e.report is not None:
                _print_report(e.report)
            raise
    for report in (result.report, result.decoder_report):
        if report is not None:
            _print_report(report)
    if result.openvino is not None:
        _print_openvino(result.openvino)
    settings = result.settings
    if "lowering" in settings:
        _print_lowering(settings)
    if variant is not None:
        from .variants.request import describe

        out.print(describe(settings), highlight=False)
    detail = f"conv={settings['conv']}" + (f", opset {settings['opset']}" if "opset" in settings else "")
    detail += f", {settings['dtype']}" if variant is not None else ""
    out.print(f"[green]wrote[/] {', '.join(str(Path(output) / f) for f in result.files)} ({detail})", highlight=False)


_signalled: set[str] = set()


def _signal_at(phase: str) -> None:
    """For the tests of interruption: GSS_EXPORT_SIGNAL_AT=PHASE:SIGNAL (e.g. validate:SIGTERM; several joined by
    commas) makes this process send itself SIGNAL when PHASE (load, export, validate, decoder, publish) begins, an
    exact point however loaded the machine is."""
    for entry in os.environ.get("GSS_EXPORT_SIGNAL_AT", "").split(","):
        phase_at, _, name = entry.partition(":")
        if phase_at == phase and entry not in _signalled and hasattr(signal, name):
            _signalled.add(entry)
            signal.raise_signal(getattr(signal, name))


def _variant_kind(dtype, quantize, int8_activations, int8_cpu, min_top1, max_kl, heldout_text, rtol, atol) -> Optional[str]:
    """"fp16", "int8" or None (float32); option combinations that make no sense are refused (exit 2)."""
    kind = "fp16" if dtype is DType.fp16 else None
    if quantize is not None:
        if kind is not None:
            raise GSSExportError("choose --dtype fp16 or --quantize int8, not both")
        kind = quantize.value
    if kind is None:
        extra = [flag for flag, given in (("--min-top1", min_top1 is not None), ("--max-kl", max_kl is not None),
                                          ("--heldout-text", heldout_text is not None),
                                          ("--int8-activations", int8_activations is not Int8Activations.auto),
                                          ("--int8-cpu", int8_cpu is not Int8Cpu.auto)) if given]
        if extra:
            raise GSSExportError(f"{', '.join(extra)} {'applies' if len(extra) == 1 else 'apply'} to --dtype fp16 or --quantize int8 exports only")
        return None
    for flag, given in (("--int8-activations", int8_activations is not Int8Activations.auto), ("--int8-cpu", int8_cpu is not Int8Cpu.auto)):
        if kind == "fp16" and given:
            raise GSSExportError(f"{flag} applies to --quantize int8 only")
    if rtol is not None or atol is not None:
        raise GSSExportError("an fp16/int8 export is checked by top-1 agreement and KL divergence on held-out text "
                             "(--min-top1, --max-kl), not by --rtol/--atol")
    return kind


def _print_report(report) -> None:
    if getattr(report, "threshold", None) is not None:  # a quality report (fp16 / int8)
        return _print_quality(report)
    table = Table(title=f"{report.artifact} vs {report.reference}", title_justify="left")
    cases = any(r.case for r in report.rows)  # the decoder's rows are named cases
    for name in (("case",) if cases else ()) + ("batch", "length", "max abs error", "max rel error", ""):
        table.add_column(name, justify="left" if name == "case" else "right")
    for r in report.rows:
        status = "[green]ok[/]" if r.passed else f"[red]FAIL[/] {r.error or ''}"
        cells = [str(r.batch), str(r.length), f"{r.max_abs:.2e}", f"{r.max_rel:.2e}", status]
        table.add_row(*(([r.case] if cases else []) + cells))
    out.print(table)
    worst_abs, worst_rel = report.worst
    out.print(f"worst: abs {worst_abs:.2e}, rel {worst_rel:.2e} (tolerance rtol {report.tolerance.rtol:g}, atol {report.tolerance.atol:g})")
    # the table already shows failing shapes; list the rest (names, metadata, crashes) briefly
    shown = [f for f in report.failures if not f.startswith("batch ")] or report.failures
    for failure in shown[:5]:
        console.print(f"[red]x[/] {failure}", highlight=False)
    if len(shown) > 5:
        console.print(f"  ... and {len(shown) - 5} more")


def _print_quality(report) -> None:
    """One row: agreement with float32 eager on held-out text, and the size against float32 (failures: the error says)."""
    table = Table(title=f"{report.artifact} vs {report.reference}", title_justify="left", caption=f"held-out: {report.text}",
                  caption_justify="left")
    for name in ("positions", "top-1", "KL mean", "KL max", "MB", "vs fp32", ""):
        table.add_column(name, justify="right")
    t = report.threshold
    table.add_row(f"{report.windows}x{report.window}", f"{report.top1:.4f}>={t.min_top1:g}", f"{report.kl:.1e}<={t.max_kl:g}",
                  f"{report.kl_max:.1e}", f"{report.bytes / 1e6:.2f}", f"{report.size_ratio:.2f}x", "[green]ok[/]" if report.ok else "[red]FAIL[/]")
    out.print(table)


def _print_lowering(settings: dict) -> None:
    """ExecuTorch: per method the working memory planned for the bounds, and the ops left outside XNNPACK."""
    table = Table(title=f"model.pte ({settings['bytes'] / 1e6:.1f} MB), batch up to {settings['max_batch']}", title_justify="left")
    for name in ("method", "planned memory", "ops outside XNNPACK (portable kernels)"):
        table.add_column(name, justify="right" if name == "planned memory" else "left")
    for method, report in settings["lowering"].items():
        ops = ", ".join(f"{op} {n}" for op, n in report["outside_xnnpack"].items()) or "none"
        table.add_row(method, f"{report['planned_bytes'] / 2**20:.1f} MiB", ops)
    out.print(table)


def _print_openvino(checked) -> None:
    """The f32 parity tables, the bf16 quality rows, and whether bf16 is offered."""
    for report in (checked.forward, checked.decoder, *checked.bf16):
        if report is not None:
            _print_report(report)
    if checked.bf16_ok:
        out.print("[green]bf16 on OpenVINO passed its quality bar[/]: gss-run/gss-serve --backend openvino --precision bf16")
    else:
        why = checked.record()["bf16"]["failures"]
        out.print(f"[yellow]bf16 on OpenVINO is not offered[/] for this export: {'; '.join(why)}", highlight=False)


def _typer_usage(e: Exception) -> int | None:
    """The exit code of typer's own exits and usage errors (shown here), or None for anything else."""
    if isinstance(e, typer.Exit):
        return e.exit_code
    if isinstance(e, typer.Abort):
        console.print("[red]aborted[/]")
        return 130
    # typer >= 0.29 raises its own usage errors (no longer click's): match them by shape
    if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
        e.show()
        return e.exit_code
    return None


def main() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name="gss-export")(export)

    def call() -> None:
        # typer returns the exit code of its own exits (Ctrl-C while it parses: 130) instead of raising it
        code = app(standalone_mode=False, prog_name="gss-export")
        if isinstance(code, int) and code:
            raise SystemExit(code)

    guarded(call, (GSSExportError,), "GSS_EXPORT_DEBUG", _typer_usage)


if __name__ == "__main__":
    main()
