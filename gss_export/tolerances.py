"""The one table of tolerances for comparing artifacts with eager PyTorch.

A shape passes when max|artifact - eager| <= atol + rtol * max|eager| over all logits
(the allclose rule applied to the max norm: elementwise relative error is meaningless
near zero logits). `rel` in reports is max|artifact - eager| / max|eager|.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float = 0.0

    def passes(self, max_abs: float, ref_max: float) -> bool:
        return max_abs <= self.atol + self.rtol * ref_max


TOLERANCES: dict[str, Tolerance] = {
    # float32 artifacts against float32 eager; measured errors are ~1e-6 relative
    "onnx": Tolerance(rtol=1e-4),
    "torchscript": Tolerance(rtol=1e-4),
    "pt2": Tolerance(rtol=1e-4),
    "aoti": Tolerance(rtol=1e-4),
    # our own eager forms against upstream's FFT evaluation
    "eager": Tolerance(rtol=1e-4),
}


def tolerance_for(target: str, rtol: float | None = None, atol: float | None = None) -> Tolerance:
    """The table's tolerance for `target`, with user overrides."""
    base = TOLERANCES[target]
    return Tolerance(rtol=base.rtol if rtol is None else rtol, atol=base.atol if atol is None else atol)
