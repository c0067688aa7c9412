"""Output folders written all-or-nothing, and the `config.json` that describes an export.

An export is built and validated in a staging folder beside the output folder; only a
successful one is moved in, file by file with `os.replace`, so a failed export never
damages an earlier good one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import GSSExportError

CONFIG_NAME = "config.json"


@contextmanager
def staged_output(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; on normal exit move its files into `out_dir`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GSSExportError(f"output path {out} exists and is not a folder")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=parent))
    except OSError as e:
        raise GSSExportError(f"cannot write beside {out}: {e.strerror or e}") from e
    try:
        yield staging
        out.mkdir(exist_ok=True)
        # config.json last: a reader that sees the new config also sees the new model
        names = sorted(p.name for p in staging.iterdir())
        names.sort(key=lambda name: name == CONFIG_NAME)
        for name in names:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
