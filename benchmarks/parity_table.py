"""Max absolute and relative error of every artifact against upstream eager, per length.

    python benchmarks/parity_table.py [CKPT] [--max-seq-len 2048]

Exports CKPT (default: the bundled example) as ONNX (each conv form at opsets 17, 18, 20) and
TorchScript (each form), runs each artifact at batch 1 and 3 over the test lengths, and prints
a Markdown table: rel = max|artifact - eager| / max|eager| over both batch sizes.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from gss_export.checkpoint import load_checkpoint
from gss_export.export import export_model
from gss_export.targets.torchscript import load_torchscript
from gss_export.validation import eager_reference

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "byte_lm" / "model.safetensors"
ARTIFACTS = [("onnx", f, o) for f in ("direct", "fft", "monarch") for o in (17, 18, 20)] + [
    ("torchscript", f, None) for f in ("direct", "fft", "monarch")
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", type=Path, default=EXAMPLE)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    args = parser.parse_args()
    model = load_checkpoint(args.checkpoint, max_seq_len=args.max_seq_len).model
    reference, name = eager_reference(model)
    lengths = sorted({n for n in (1, 2, 7, 16, 17, 100, 127, 128, 129, 1000, 1024, 1025) if n < args.max_seq_len} | {args.max_seq_len})
    rng = np.random.default_rng(0)
    cases = {}
    for n in lengths:
        for b in (1, 3):
            ids = rng.integers(0, model.config.num_tokens, size=(b, n), dtype=np.int64)
            with torch.no_grad():
                cases[(b, n)] = (ids, reference(torch.from_numpy(ids)).numpy().astype(np.float64))

    print(f"errors against {name}, batch 1 and 3; cells: max rel error per length\n")
    print("| artifact | " + " | ".join(f"n={n}" for n in lengths) + " | worst abs | worst rel |")
    print("|---|" + "---|" * (len(lengths) + 2))
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, form, opset in ARTIFACTS:
            out = Path(tmp) / f"{fmt}-{form}-{opset}"
            export_model(model, fmt, out, conv=form, opset=opset or 18, validate=False)
            if fmt == "onnx":
                session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
                run = lambda ids, s=session: s.run(["logits"], {"input_ids": ids})[0]
            else:
                scripted = load_torchscript(out / "model.pt")
                run = lambda ids, m=scripted: m(torch.from_numpy(ids)).detach().numpy()
            per_len, worst_abs, worst_rel = {}, 0.0, 0.0
            for (b, n), (ids, want) in cases.items():
                abs_err = float(np.abs(run(ids) - want).max())
                rel = abs_err / float(np.abs(want).max())
                per_len[n] = max(per_len.get(n, 0.0), rel)
                worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel)
            label = f"{fmt} {form}" + (f" opset {opset}" if opset else "")
            print(f"| {label} | " + " | ".join(f"{per_len[n]:.1e}" for n in lengths) + f" | {worst_abs:.1e} | {worst_rel:.1e} |", flush=True)


if __name__ == "__main__":
    main()
