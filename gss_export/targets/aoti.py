"""Export to an AOTInductor package: `model.pt2` with compiled `model` (forward) and `step`.

The torch.export programs of `pt2.py`, compiled ahead of time by inductor into shared
libraries (weights inside), packaged together. Python: `torch._inductor.aoti_load_package(path)`
(the forward) or `torch._inductor.package.load_package(path, "step")`; C++:
`torch::inductor::AOTIModelPackageLoader(path, "model" | "step")` (runtime/cpp). Compiling needs a
C++ compiler at export time, not at load time.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .decoder_io import PAST_LAYOUT, state_kind
from ..errors import GSSExportError
from .signatures import quiet_tracing
from .pt2 import build_programs


def build_and_save_aoti(model, path: Path, metadata: dict, *, conv: str = "auto") -> None:
    """Export, compile and package forward and step into `path`."""
    from torch.export.pt2_archive._package import package_pt2

    programs = build_programs(model, conv=conv, fmt="aoti")
    c = model.config
    # what a C++ loader needs to size the state and check ids (AOTIModelPackageLoader::get_metadata)
    sizes = {k: str(getattr(c, k)) for k in ("family", "num_tokens", "max_seq_len", "depth")}
    sizes["prefill_above"] = str(metadata["export"]["prefill_above"])
    if state_kind(c) == "append":
        sizes.update(state="append", heads=str(c.heads), dim_dsconv=str(c.dim_dsconv), past_layout=PAST_LAYOUT)
    else:  # one state tensor per layer, (batch, *state_shape)
        sizes.update(state="replace", state_shape=",".join(str(d) for d in c.state_shapes()[0][1:]))
    files = {}
    with quiet_tracing():
        for name, program in programs.items():
            try:
                files[name] = torch._inductor.aot_compile(
                    program.module(), program.example_inputs[0], program.example_inputs[1],
                    options={"aot_inductor.package": True, "aot_inductor.metadata": sizes},
                )
            except Exception as e:  # inductor's failures are long; the first line says what broke
                raise GSSExportError(f"AOTInductor could not compile {name!r}: {str(e).splitlines()[0][:300]}") from e
        package_pt2(str(path), aoti_files=files, extra_files={"config.json": json.dumps(metadata)})


def load_aoti(path: Path, name: str = "model"):
    """The compiled model `name` ("model": forward, or "step") from a package written by `build_and_save_aoti`."""
    from torch._inductor.package import load_package

    with quiet_tracing():
        return load_package(str(path), name)
