"""`gss-export`: a thin typer layer over `gss_export.export.export_model`."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from gss_runtime.cli_support import run_cli

from . import DEFAULT_OPSET
from .errors import GSSExportError, ValidationFailed

console = Console(stderr=True)
out = Console()


class Format(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"
    pt2 = "pt2"
    aoti = "aoti"


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
    checkpoint: Path = typer.Argument(..., help="state dict (.pt/.pth/.bin/.ckpt) or .safetensors of a GatedDsConvLM"),
    format: Format = typer.Option(Format.onnx, "--format", "-f", help="artifact to produce"),
    output: Path = typer.Option(..., "--output", "-o", help="output folder (created; replaced only by a validated export)"),
    opset: int = typer.Option(DEFAULT_OPSET, help="ONNX opset, 17-23 (20 and later run GELU as one operator)"),
    conv: Conv = typer.Option(Conv.auto, help="convolution form; auto picks the measured fastest for the format"),
    max_seq_len: int = typer.Option(2048, "--max-seq-len", min=1, help="longest sequence the artifact accepts (not stored in checkpoints)"),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="compare the artifact with eager PyTorch"),
    rtol: Optional[float] = typer.Option(None, help="relative tolerance (default from the tolerance table: 1e-4)"),
    atol: Optional[float] = typer.Option(None, help="absolute tolerance (default 0)"),
    batch_sizes: str = typer.Option("1,3", help="batch sizes to validate, e.g. 1,3"),
    lengths: Optional[str] = typer.Option(None, help="lengths to validate (default 1,2,7,16,17,64,65,100,127,128,129,1000,1024,1025 and the maximum)"),
    external_data: Optional[bool] = typer.Option(None, "--external-data/--inline", help="ONNX weights beside the model (default: only when over 1.8 GB)"),
    decoder: bool = typer.Option(True, "--decoder/--no-decoder", help="ONNX: also write decoder.onnx, the decoder with state for generation"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="allow pickled objects in the checkpoint (runs code it contains: only for files you trust)"),
) -> None:
    """Export a GatedDsConvLM checkpoint to ONNX or TorchScript, dynamic in batch and length, validated against eager PyTorch."""
    from .checkpoint import load_checkpoint
    from .export import export_model
    from .tolerances import tolerance_for
    from .validation import DEFAULT_BATCHES, DEFAULT_LENGTHS, default_shapes

    batches = _int_list(batch_sizes, "--batch-sizes") or list(DEFAULT_BATCHES)
    picked_lengths = _int_list(lengths, "--lengths") or list(DEFAULT_LENGTHS)
    loaded = load_checkpoint(checkpoint, max_seq_len=max_seq_len, trust_pickle=trust_pickle)
    cfg = loaded.config
    console.print(
        f"[bold]{checkpoint}[/]: GatedDsConvLM num_tokens={cfg.num_tokens} dim={cfg.dim} depth={cfg.depth} "
        f"heads={cfg.heads} dim_dsconv={cfg.dim_dsconv} dim_expansion_factor={cfg.dim_expansion_factor} max_seq_len={cfg.max_seq_len}"
    )
    for note in loaded.notes:
        console.print(f"  [dim]{note}[/]")

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int, label: str) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total, description=f"{stage}: {label}")

        try:
            result = export_model(
                loaded.model, format.value, output, conv=conv.value, opset=opset, validate=validate,
                tolerance=tolerance_for(format.value, rtol, atol), shapes=default_shapes(cfg.max_seq_len, batches, picked_lengths),
                external_data=external_data, decoder=decoder, source={"checkpoint": str(checkpoint), "notes": list(loaded.notes)},
                on_progress=on_progress,
            )
        except ValidationFailed as e:
            bar.stop()
            if e.report is not None:
                _print_report(e.report)
            raise
    for report in (result.report, result.decoder_report):
        if report is not None:
            _print_report(report)
    settings = result.settings
    detail = f"conv={settings['conv']}" + (f", opset {settings['opset']}" if "opset" in settings else "")
    out.print(f"[green]wrote[/] {', '.join(str(Path(output) / f) for f in result.files)} ({detail})", highlight=False)


def _print_report(report) -> None:
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


def main() -> None:
    run_cli(export, "gss-export", (GSSExportError,), "GSS_EXPORT_DEBUG")


if __name__ == "__main__":
    main()
