"""The export targets: one module each beside this one, one class each here, listed in one table (`TARGETS`).

A target owns its file name, its tolerance and `auto` convolution form (by its name in
`tolerances.TOLERANCES` and `conv.forms.AUTO_FORM`), its settings, how it builds and saves the
artifact, how validation runs its forward, and how its incremental decoder is loaded. `export.py`
drives any of them the same way: build -> compare forward -> compare the decoder -> config.json.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..artifacts import save_onnx
from ..conv.forms import SWITCH_FORMS, resolve_form
from ..families import family_of
from ..validation import ValidationReport, torch_runner
from . import aoti, executorch, onnx, onnx_decoder, pt2, torchscript
from .decoder_io import describe
from .torch_decoder import TorchDecoder

Progress = Callable[[str, int, int, str], None]


class Target:
    """One export format. `build` writes into `staging` and returns the main file's path."""

    name: str
    variants = False  # fp16 / int8 files (ONNX only)

    def settings(self, model, *, conv: str, opset: int) -> dict:
        """What the export records of itself (config.json's `export`); ExecuTorch also takes max_batch."""
        raise NotImplementedError

    def build(self, model, staging: Path, settings: dict, metadata: dict, *, conv: str, opset: int,
              external_data: bool | None, decoder: bool, variant, progress: Progress) -> Path:
        raise NotImplementedError

    def forward(self, path: Path, report: ValidationReport) -> Callable[[np.ndarray], np.ndarray] | None:
        """input_ids -> logits through the artifact; interface failures go into `report` (then None)."""
        raise NotImplementedError

    def decoder(self, staging: Path, path: Path, model, decoder: bool):
        """(what decodes this export incrementally, the file it lives in), or None."""
        return None


class OnnxTarget(Target):
    name, variants = "onnx", True

    def settings(self, model, *, conv, opset):
        return {**onnx.export_settings(model, conv=self.form(model, conv), opset=opset), "conv_requested": conv}

    @staticmethod
    def form(model, conv: str) -> str:
        """`auto` as the family measured it, where that differs from the target's default."""
        return family_of(model).auto_forms.get("onnx", conv) if conv == "auto" else conv

    def build(self, model, staging, settings, metadata, *, conv, opset, external_data, decoder, variant, progress):
        def save_onnx_file(proto, path):
            """float32, or the requested fp16/int8 variant (`variants.request.VariantRequest.save`)."""
            if variant is None:
                save_onnx(proto, path, external_data)
            else:
                variant.save(proto, path, external_data, settings)

        conv = self.form(model, conv)
        if variant is not None and resolve_form(conv, "onnx") == "switch":
            # onnxruntime's float16 converter and quantizer rewrite the top-level graph, not If branches
            conv = SWITCH_FORMS[1]
            settings.update(onnx.export_settings(model, conv=conv, opset=opset))
        if variant is not None:
            settings.update(variant.settings())
        config = metadata["model"]
        proto = onnx.build_onnx(model, conv=conv, opset=opset)
        onnx.annotate(proto, {**metadata, "export": settings})
        path = staging / settings["file"]
        save_onnx_file(proto, path)
        if decoder:
            io = describe(model.config)
            for name, prefill, how in ((onnx_decoder.FILE, False, "direct"), (onnx_decoder.PREFILL_FILE, True, onnx_decoder.PREFILL_FORM)):
                progress("export", 0, 1, f"building {name}")
                graph = onnx_decoder.build_decoder(model, opset=opset, prefill=prefill)
                onnx.annotate(graph, {"model": config, "export": {**settings, "file": name, "conv": how}, **io})
                save_onnx_file(graph, staging / name)
            settings["decoder"] = {"file": onnx_decoder.FILE, **io}
            settings["prefill"] = {"file": onnx_decoder.PREFILL_FILE, "conv": onnx_decoder.PREFILL_FORM,
                                   "use_above_new_tokens": io["prefill_above"]}
        return path

    def forward(self, path, report):
        from ..validation import onnx_forward

        return onnx_forward(path, report)

    def decoder(self, staging, path, model, decoder):
        if not decoder:
            return None
        from gss_runtime.decoder import Decoder

        return Decoder(staging, provider="cpu"), onnx_decoder.FILE


class TorchScriptTarget(Target):
    name = "torchscript"

    def settings(self, model, *, conv, opset):
        return torchscript.export_settings(model, conv=conv)

    def build(self, model, staging, settings, metadata, *, conv, **_):
        path = staging / settings["file"]
        torchscript.save_torchscript(torchscript.build_torchscript(model, conv=conv), path, {**metadata, "export": settings})
        return path

    def forward(self, path, report):
        scripted = torchscript.load_torchscript(path)
        args = [a.name for a in scripted.forward.schema.arguments][1:]
        if args != ["input_ids"]:
            report.failures.append(f"forward arguments {args}, expected ['input_ids']")
            return None
        return torch_runner(scripted)

    def decoder(self, staging, path, model, decoder):
        scripted = torchscript.load_torchscript(path)
        return TorchDecoder(scripted.step, model.config, prefill=scripted.prefill), f"{path.name} (step, prefill)"


class Pt2Target(Target):
    name = "pt2"

    def settings(self, model, *, conv, opset):
        return pt2.export_settings(model, conv=conv, fmt=self.name)

    def build(self, model, staging, settings, metadata, *, conv, **_):
        path = staging / settings["file"]
        pt2.save_pt2(pt2.build_programs(model, conv=conv), path, {**metadata, "export": settings})
        return path

    def load(self, path: Path, program: str):
        return pt2.load_pt2_program(path, program)

    def forward(self, path, report):
        return torch_runner(self.load(path, "model"))

    def decoder(self, staging, path, model, decoder):
        return TorchDecoder(self.load(path, "step"), model.config, prefill=self.load(path, "prefill")), f"{path.name} (step, prefill)"


class AotiTarget(Pt2Target):
    name = "aoti"

    def build(self, model, staging, settings, metadata, *, conv, **_):
        path = staging / settings["file"]
        aoti.build_and_save_aoti(model, path, {**metadata, "export": settings}, conv=conv)
        return path

    def load(self, path: Path, program: str):
        return aoti.load_aoti(path, program)


class ExecuTorchTarget(Target):
    name = "executorch"

    def settings(self, model, *, conv, opset, max_batch=None):
        return executorch.export_settings(model, conv=conv, max_batch=max_batch)

    def build(self, model, staging, settings, metadata, *, conv, **_):
        path = staging / settings["file"]
        executorch.save_pte(model, path, settings)
        return path

    def forward(self, path, report):
        return executorch.PteProgram(path).forward

    def decoder(self, staging, path, model, decoder):
        return executorch.PteProgram(path, model.config).decoder(), f"{path.name} (step, prefill)"


TARGETS: dict[str, Target] = {t.name: t for t in (OnnxTarget(), TorchScriptTarget(), Pt2Target(), AotiTarget(), ExecuTorchTarget())}
FORMATS = tuple(TARGETS)

__all__ = ["TARGETS", "FORMATS", "Target"]
