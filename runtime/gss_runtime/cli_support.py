"""Running a command-line program so that users see one clear message, never a traceback.

Shared by `gss-run` (argparse) and `gss-export` (typer, which passes its own usage errors in), so the
rule is written once; it needs no command-line or terminal library, which keeps the runtime small.
"""
from __future__ import annotations

import os
import sys
from typing import Callable


def print_error(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")


def guarded(call: Callable[[], None], user_errors: tuple[type[Exception], ...], debug_env: str,
            usage_error: Callable[[Exception], int | None] = lambda e: None) -> None:
    """Run `call()` as a program's body.

    `user_errors` (each with an `exit_code`) print their message and exit with that code; an exception
    for which `usage_error` returns an exit code has shown itself and exits with it; Ctrl-C exits 130;
    anything else is a bug: one line, exit 3, and the traceback only when the environment variable
    `debug_env` is set.
    """
    try:
        call()
    except user_errors as e:
        print_error(str(e))
        raise SystemExit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        sys.stderr.write("aborted\n")
        raise SystemExit(130)
    except Exception as e:
        code = usage_error(e)
        if code is not None:
            raise SystemExit(code)
        if os.environ.get(debug_env):
            raise
        print_error(f"internal error: {type(e).__name__}: {e} (set {debug_env}=1 for the traceback)")
        raise SystemExit(3)
