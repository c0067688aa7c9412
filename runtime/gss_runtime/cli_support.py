"""Running a command-line program so that users see one clear message, never a traceback.

Shared by `gss-run` (argparse) and `gss-export` (typer, which passes its own usage errors in), so the
rule is written once; it needs no command-line or terminal library, which keeps the runtime small.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. Not an Exception, so no `except Exception` on the way swallows it;
    the program exits with 128 + the signal's number, as a shell reports a process the signal ended."""

    def __init__(self, signum: int, message: str | None = None):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message or f"interrupted by {self.signal_name}")

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signum)


def handled_signals() -> list[int]:
    """SIGINT and SIGTERM, less those this process ignores, which stay ignored: a program started with SIGINT
    ignored (a background job of a script) must not become interruptible by the terminal's Ctrl-C, as POSIX
    tools do; less, too, those whose handler was not set from Python, which could not be put back."""
    return [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) not in (signal.SIG_IGN, None)]


def print_error(message: str) -> None:
    sys.stderr.write(f"error: {message}\n")


def guarded(call: Callable[[], None], user_errors: tuple[type[Exception], ...], debug_env: str,
            usage_error: Callable[[Exception], int | None] = lambda e: None) -> None:
    """Run `call()` as a program's body.

    `user_errors` (each with an `exit_code`) print their message and exit with that code; an exception
    for which `usage_error` returns an exit code has shown itself and exits with it; SIGINT (Ctrl-C) and
    SIGTERM print one line and exit 130 and 143; a closed stdout (`| head`) ends quietly; anything else
    is a bug: one line, exit 3, and the traceback only when the environment variable `debug_env` is set.
    A signal ignored when it is called stays ignored.
    """
    # both raise Interrupted, so cleanup on the way out runs (by default SIGTERM ends the process at once)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, _raise_interrupted) for s in handled_signals()}
    try:
        try:
            call()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    except Interrupted as e:
        sys.stderr.write(f"{e}\n")
        raise SystemExit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130)
    except BrokenPipeError:
        _quiet_stdout()
        raise SystemExit(141)  # 128 + SIGPIPE, what the shell shows for a program ended by a closed pipe
    except user_errors as e:
        print_error(str(e))
        raise SystemExit(getattr(e, "exit_code", 2))
    except Exception as e:
        code = usage_error(e)
        if code is not None:
            raise SystemExit(code)
        if os.environ.get(debug_env):
            raise
        print_error(f"internal error: {type(e).__name__}: {e} (set {debug_env}=1 for the traceback)")
        raise SystemExit(3)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so flushing it at exit does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
