"""Export to an ExecuTorch program for phones and boards: `model.pte` with the methods `forward`, `step` and `prefill`.

The torch.export programs of `pt2.py` (the same interface: `step` and `prefill` are the decoder with
state), with bounds sized for a device: batch up to `max_batch` (default 4), length up to max_seq_len.
The convolution is the FFT at length 2n along the last axis of contiguous tensors (`fft2n_last`), the
layout ExecuTorch's FFT kernels take. The programs are lowered with the XNNPACK partitioner: matrix
products and most elementwise work run in XNNPACK; what it does not take (the FFTs, gathers, complex
products) runs on ExecuTorch's portable kernels, and is listed in the export settings. ExecuTorch plans
each method's working memory for the largest input its bounds allow; the plan is reported per method.

`executorch` is an optional extra (`pip install "gss-export[executorch]"`), imported only here.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import __version__
from ..errors import GSSExportError
from .decoder_io import state_kind
from .pt2 import build_programs as build_programs_pt2, torch_export_form
from .signatures import quiet_tracing

if TYPE_CHECKING:  # annotations only
    from ..families import GatedLM

FILE = "model.pte"
METHODS = ("forward", "step", "prefill")
DEFAULT_MAX_BATCH = 4
MAX_BATCH_LIMIT = 64


def require_executorch() -> None:
    try:
        import executorch  # noqa: F401
    except ImportError:
        raise GSSExportError('--format executorch needs ExecuTorch: pip install "gss-export[executorch]" '
                             "(or pip install executorch, beside torch)") from None


def export_settings(model: GatedLM, *, conv: str, max_batch: int | None = None) -> dict:
    require_executorch()
    max_batch = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    if not 2 <= max_batch <= MAX_BATCH_LIMIT:
        raise GSSExportError(f"--max-batch must be from 2 to {MAX_BATCH_LIMIT} for an ExecuTorch program (got {max_batch}): "
                             "ExecuTorch plans memory for the largest batch allowed")
    from importlib.metadata import version

    return {"format": "executorch", "file": FILE, "conv": torch_export_form(conv, "executorch"), "conv_requested": conv,
            "methods": list(METHODS), "max_batch": max_batch, "dtype": "float32", "gss_export_version": __version__,
            "torch_version": torch.__version__, "executorch_version": version("executorch")}


def build_programs(model: GatedLM, settings: dict) -> dict:
    """{"forward", "step", "prefill"}: pt2's programs with batch <= max_batch, `step` taking what runtimes send
    it, up to the family's prefill threshold: planned for max_seq_len new tokens, its direct product over the
    past would need gigabytes."""
    programs = build_programs_pt2(model, conv=settings["conv_requested"], fmt="executorch", max_batch=settings["max_batch"],
                                  step_max_new=settings["prefill_above"])
    return {"forward": programs.pop("model"), **programs}


def partitioner():
    """XNNPACK's partitioner, except for unsqueezes with more than one dynamic axis in their output: its
    partitioner takes them, then its serialiser refuses them ("XNNPACK reshape only supports 1 dynamic
    dimension"; the recurrent families' kernels have batch and length), so they stay portable."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import UnsqueezeCopyConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class OneDynamicAxisUnsqueeze(UnsqueezeCopyConfig):
        def check_constraints(self, node, ep) -> bool:
            dynamic = sum(not isinstance(d, int) for d in node.meta["val"].shape)
            return dynamic <= 1 and super().check_constraints(node, ep)

    configs = [OneDynamicAxisUnsqueeze if c is UnsqueezeCopyConfig else c for c in ALL_PARTITIONER_CONFIGS]
    return XnnpackPartitioner(configs=configs)


def lower(programs: dict) -> tuple[bytes, dict]:
    """(the .pte bytes, what the lowering did: per method the planned working memory and the ops XNNPACK did not take)."""
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    try:
        with quiet_tracing():
            # the IR check refuses complex products (the FFT convolution's), which the portable kernels run
            edge = to_edge_transform_and_lower(programs, partitioner=[partitioner()],
                                               compile_config=EdgeCompileConfig(_check_ir_validity=False))
            outside = {name: _outside_xnnpack(edge.exported_program(name)) for name in programs}
            manager = edge.to_executorch()
    except Exception as e:  # the lowering's own errors name an op or a dtype: pass that on
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise GSSExportError(f"ExecuTorch could not lower this model: {type(e).__name__}: {first}") from None
    plans = {plan.name: int(sum(plan.non_const_buffer_sizes)) for plan in manager.executorch_program.execution_plan}
    report = {name: {"planned_bytes": plans.get(name, 0), "outside_xnnpack": outside[name]} for name in programs}
    return manager.buffer, report


def _outside_xnnpack(program) -> dict[str, int]:
    """Op name -> count of the calls left to ExecuTorch's portable kernels (not in an XNNPACK delegate)."""
    ops = Counter()
    for node in program.graph.nodes:
        name = getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and "call_delegate" not in name and name not in ("getitem", "sym_size.int"):
            ops[name.split("::")[-1].replace("aten.", "").replace(".default", "")] += 1
    return dict(sorted(ops.items()))


def save_pte(model: GatedLM, path: Path, settings: dict) -> dict:
    """Build, lower and write `path`; returns the lowering report (also put into settings["lowering"])."""
    buffer, report = lower(build_programs(model, settings))
    path.write_bytes(buffer)
    settings["lowering"] = report
    settings["bytes"] = len(buffer)
    return report


class PteProgram:
    """A model.pte opened with `executorch.runtime`: numpy in, numpy out, bounds checked first.

    forward(ids (b, n)) -> logits (b, n, num_tokens); `decoder()` gives a TorchDecoder over step and prefill
    (the interface `gss_runtime.Decoder` has), for validation and generation.
    """

    def __init__(self, path: Path, config=None):
        require_executorch()
        from executorch.runtime import Runtime

        self.path, self.config = Path(path), config
        program = Runtime.get().load_program(str(path))
        self.methods = {name: program.load_method(name) for name in METHODS}
        # the bounds the program was planned for: the forward input's largest shape
        self.max_batch, self.max_seq_len = self.methods["forward"].metadata.input_tensor_meta(0).sizes()

    def _check(self, ids: torch.Tensor, context: int = 0) -> None:
        b, n = ids.shape
        if b > self.max_batch:
            raise GSSExportError(f"batch {b} is above this program's bound of {self.max_batch} (re-export with --max-batch)")
        if n > self.max_seq_len or context > self.max_seq_len + 1:
            raise GSSExportError(f"{max(n, context - 1)} positions are above this program's max_seq_len {self.max_seq_len}")

    def forward(self, ids) -> np.ndarray:
        ids = torch.as_tensor(np.asarray(ids, np.int64))
        self._check(ids)
        return self.methods["forward"].execute([ids])[0].numpy()

    def _stepper(self, name: str):
        method, append = self.methods[name], state_kind(self.config) == "append"

        def run(ids, pad, *state):
            self._check(ids, state[1][0].shape[0] if append else 0)  # the context: k (context, b, heads)
            flat = [t.contiguous() for group in state for t in group]
            return tuple(method.execute([ids.contiguous(), pad.contiguous(), *flat]))

        return run

    def decoder(self):
        from .torch_decoder import TorchDecoder

        step_max = self.methods["step"].metadata.input_tensor_meta(0).sizes()[1]
        decoder = TorchDecoder(self._stepper("step"), self.config, prefill=self._stepper("prefill"), step_max=step_max)
        decoder.max_batch = self.max_batch  # validation leaves out cases of more rows than the program allows
        return decoder

    def generate(self, prompt, max_new_tokens: int) -> list[int]:
        """Greedy tokens after `prompt` (ids): the prompt through `prefill` above the family's threshold (else
        `step`), then one `step` per token. The driver the tests use; an app calls the same methods."""
        decoder = self.decoder()
        logits, state = decoder.feed(np.asarray([prompt], np.int64), decoder.empty_state([0]))
        tokens = [int(logits[0, -1].argmax())]
        while len(tokens) < max_new_tokens:
            logits, state = decoder.step([tokens[-1]], state)
            tokens.append(int(logits[0].argmax()))
        return tokens[:max_new_tokens]
