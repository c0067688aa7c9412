"""Running a typer command so that users see one clear message, never a traceback.

Shared by `gss-run` and `gss-export` (torch-free, so the runtime can own it).
"""
from __future__ import annotations

import os
from typing import Callable

import typer
from rich.console import Console
from rich.text import Text

console = Console(stderr=True)


def print_error(message: str) -> None:
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


def run_cli(command: Callable, name: str, user_errors: tuple[type[Exception], ...], debug_env: str) -> None:
    """Run `command` as the program `name`.

    `user_errors` (each with an `exit_code`) print their message and exit with that code;
    usage errors print themselves (exit 2); anything else is a bug: one line, exit 3, and
    the traceback only when the environment variable `debug_env` is set.
    """
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name=name)(command)
    try:
        app(standalone_mode=False, prog_name=name)
    except user_errors as e:
        print_error(str(e))
        raise SystemExit(getattr(e, "exit_code", 2))
    except typer.Exit as e:
        raise SystemExit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        console.print("[red]aborted[/]")
        raise SystemExit(130)
    except Exception as e:
        # typer >= 0.29 raises its own usage errors (no longer click's): match them by shape
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            raise SystemExit(e.exit_code)
        if os.environ.get(debug_env):
            raise
        print_error(f"internal error: {type(e).__name__}: {e} (set {debug_env}=1 for the traceback)")
        raise SystemExit(3)
