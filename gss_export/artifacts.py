"""Output folders written all-or-nothing, the `config.json` that describes an export, and how an ONNX file is written.

An export is built and validated in a staging folder beside the output folder; only a
successful one is moved in, file by file with `os.replace`, so a failed export never
damages an earlier good one. The staging folder's name records the process that owns it
(`.DIR.staging-PID-START-*`), so a later export into DIR removes folders left by runs that
were killed, and never those of a live concurrent export.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import onnx

from .errors import GSSExportError

CONFIG_NAME = "config.json"
# protobuf cannot hold a single message over 2 GiB: larger weights go to external data
INLINE_LIMIT_BYTES = 1_800_000_000
# a staging folder without an owner in its name (made by an older version) is removed once this old
ORPHAN_AGE_S = 3600
_OWNED = re.compile(r"^(\d+)-(\d+)-")
_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


def _start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot (Linux), or 0 where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _alive(pid: int, start: int) -> bool:
    """Whether process `pid`, started at `start` (0: unknown), still runs; a reused pid is not it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    except OSError:
        return True
    now = _start_time(pid)
    return not (start and now and now != start)


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove staging folders of `out` whose owner is gone (killed runs); returns those removed."""
    removed = []
    try:
        candidates = list(out.resolve().parent.glob(f".{glob_escape(out.name)}.staging-*"))
    except OSError:
        return removed
    for folder in candidates:
        m = _OWNED.match(folder.name[len(out.name) + len("..staging-") :])
        try:
            if not folder.is_dir() or folder.is_symlink():
                continue
            stale = (not _alive(int(m.group(1)), int(m.group(2)))) if m else time.time() - folder.stat().st_mtime > ORPHAN_AGE_S
        except OSError:
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextmanager
def staged_output(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; on normal exit move its files into `out_dir`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GSSExportError(f"output path {out} exists and is not a folder")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)
        owner = f"{os.getpid()}-{_start_time(os.getpid())}-"
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{owner}", dir=parent))
    except OSError as e:
        raise GSSExportError(f"cannot write beside {out}: {e.strerror or e}") from e
    try:
        yield staging
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _signals_deferred() -> Iterator[list[int]]:
    """SIGINT/SIGTERM arriving in the body are recorded in the list yielded, then delivered after it.

    Only the main thread can set handlers; elsewhere signals are not deferred. An ignored signal stays
    ignored (catching it here would let it abort a publish), and one whose handler was not set from Python
    is left alone, as it could not be put back.
    """
    caught: list[int] = []
    previous = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                if signal.getsignal(s) not in (signal.SIG_IGN, None):
                    previous[s] = signal.signal(s, lambda signum, _frame: caught.append(signum))
        yield caught
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:  # delivered now, to the handler the caller had
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


def _publish(staging: Path, out: Path) -> None:
    """Move the staged files into `out`, all or none: interrupted before the last one, the old files are restored."""
    created = not out.exists()
    with _signals_deferred() as caught:
        out.mkdir(exist_ok=True)
        # config.json last: a reader that sees the new config also sees the new model
        names = sorted(p.name for p in staging.iterdir())
        names.sort(key=lambda name: name == CONFIG_NAME)
        backup = Path(tempfile.mkdtemp(prefix=".replaced-", dir=staging))
        moved: list[str] = []
        try:
            for name in names:
                moved.append(name)
                if os.path.lexists(out / name):
                    os.replace(out / name, backup / name)
                os.replace(staging / name, out / name)
            if caught:
                raise GSSExportError(f"interrupted while publishing: nothing was written to {out}")
        except BaseException:
            for name in reversed(moved):
                if os.path.lexists(backup / name):
                    os.replace(backup / name, out / name)
                elif os.path.lexists(out / name) and not os.path.lexists(staging / name):
                    os.remove(out / name)
            if created and not any(out.iterdir()):
                out.rmdir()
            raise


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_onnx(proto: onnx.ModelProto, path: Path, external_data: bool | None = None) -> None:
    """Weights inline unless too big for protobuf (or `external_data=True`): then `model.onnx.data` beside it."""
    strip_debug_metadata(proto)
    if external_data is None:
        external_data = proto.ByteSize() > INLINE_LIMIT_BYTES
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=external_data,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )


def strip_debug_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node metadata (stack traces with local file paths, FX node names).

    Nothing reads it at run time, and it is about 30% of a small model's file (0.6 of 2.3 MB for
    the example checkpoint), which would distort every size comparison.
    """
    graphs = [proto.graph]
    while graphs:  # the If branches of an `auto` export too
        for node in graphs.pop().node:
            del node.metadata_props[:]
            graphs.extend(a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
