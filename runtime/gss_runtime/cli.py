"""`gss-run`: a model's next-token predictions for a prompt, from an ONNX export, without torch."""
from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .cli_support import run_cli
from .errors import RuntimeInputError
from .runner import GSSRunner

out = Console()

BYTE_VOCAB = 256


class Provider(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def byte_text(token: int) -> str:
    """A byte token shown readably: the character if printable ASCII, else an escape like \\n or \\x00."""
    return repr(bytes([token]))[2:-1]


def parse_prompt(prompt: Optional[str], prompt_ids: Optional[str]) -> list[int]:
    """Exactly one of --prompt (text -> its UTF-8 bytes) or --prompt-ids ("1,2,3") -> token ids."""
    if (prompt is None) == (prompt_ids is None):
        raise RuntimeInputError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if prompt is not None:
        ids = list(prompt.encode("utf-8"))
    else:
        try:
            ids = [int(t) for t in prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise RuntimeInputError(f"--prompt-ids must be comma-separated integers, got {prompt_ids!r}") from None
    if not ids:
        raise RuntimeInputError("the prompt is empty: give at least one token")
    return ids


def load(model: Path, provider: Provider, threads: Optional[int], text_prompt: bool) -> GSSRunner:
    """The runner, refusing a text prompt for a model whose tokens are not bytes."""
    runner = GSSRunner(model, provider=provider.value, threads=threads)
    num_tokens = runner.config["num_tokens"]
    if text_prompt and num_tokens != BYTE_VOCAB:
        raise RuntimeInputError(
            f"--prompt encodes text as UTF-8 bytes, which needs a byte-level model (num_tokens {BYTE_VOCAB}); "
            f"this model has num_tokens {num_tokens}: use --prompt-ids"
        )
    return runner


def run(
    model: Path = typer.Argument(..., help="folder written by gss-export (model.onnx + config.json), or a .onnx file"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="text, fed as UTF-8 bytes (byte-level models, num_tokens 256)"),
    prompt_ids: Optional[str] = typer.Option(None, "--prompt-ids", help="token ids, comma-separated, e.g. 1,2,3"),
    top: int = typer.Option(5, "--top", min=1, help="how many next-token candidates to show"),
    provider: Provider = typer.Option(Provider.auto, "--provider", help="auto: CUDA when it really works, else CPU"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="onnxruntime intra-op threads"),
    json_output: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Show the most likely next tokens after a prompt."""
    ids = parse_prompt(prompt, prompt_ids)  # before loading the model: fails fast on a typo
    runner = load(model, provider, threads, text_prompt=prompt is not None)
    start = time.perf_counter()
    nxt = runner.next_token_distribution(ids, top=min(top, runner.config["num_tokens"]))
    seconds = time.perf_counter() - start
    byte_level = runner.config["num_tokens"] == BYTE_VOCAB
    if json_output:
        print(json.dumps({
            "prompt_ids": ids,
            "next": [{"id": i, "prob": p, "text": byte_text(i) if byte_level else None} for i, p in nxt],
            "provider": runner.providers[0],
            "seconds": round(seconds, 6),
        }))
        return
    _print_table(nxt, byte_level, f"next token after {len(ids)} prompt tokens")
    out.print(f"[dim]{runner.providers[0]}, {seconds * 1000:.1f} ms[/]")


def _print_table(nxt: list[tuple[int, float]], byte_level: bool, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for name in ("rank", "token id", "probability") + (("byte",) if byte_level else ()):
        table.add_column(name, justify="left" if name == "byte" else "right")
    for rank, (token, prob) in enumerate(nxt, 1):
        cells = [str(rank), str(token), f"{prob:.4f}"]
        # Text, not a str: a byte like "[" must not be read as rich markup
        table.add_row(*cells, *((Text(f"'{byte_text(token)}'"),) if byte_level else ()))
    out.print(table)


def main() -> None:
    run_cli(run, "gss-run", (RuntimeInputError,), "GSS_RUN_DEBUG")


if __name__ == "__main__":
    main()
