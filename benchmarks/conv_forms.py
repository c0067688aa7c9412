"""Prefill latency of each convolution form per target, side by side with upstream eager.

    python benchmarks/conv_forms.py [--lengths 64,512,2048] [--threads 2] [--json out.json]

Model: dim 512, depth 4, heads 8, dim_dsconv 512, num_tokens 256, batch 1 (the issue's
reference size), random weights. Each length measures every contender in turn (median of
repeats) so ratios come from the same minute of the same machine. `AUTO_FORM` in
gss_export/conv_forms.py is set from this table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from gss_export.model import GatedDsConvLM, GSSConfig
from gss_export.onnx_export import build_onnx, save_onnx
from gss_export.torchscript_export import build_torchscript


def timed(fn, min_repeats: int = 3, min_seconds: float = 1.0) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 50:
            break
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="64,512,2048")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = GSSConfig(num_tokens=256, dim=args.dim, depth=args.depth, heads=8, dim_dsconv=512, max_seq_len=max(lengths))
    model = GatedDsConvLM(cfg).eval()
    from gated_state_spaces_pytorch import GatedDsConvLM as Upstream

    upstream = Upstream(num_tokens=256, dim=cfg.dim, depth=cfg.depth, heads=8, dim_dsconv=512, max_seq_len=cfg.max_seq_len).eval()
    upstream.load_state_dict(model.state_dict())

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    contenders = {"upstream eager": lambda ids: upstream(torch.from_numpy(ids))}
    with tempfile.TemporaryDirectory() as tmp:
        for form in ("direct", "fft"):
            path = Path(tmp) / f"{form}.onnx"
            save_onnx(build_onnx(model, conv=form, opset=18), path)
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            contenders[f"onnx {form}"] = lambda ids, s=session: s.run(None, {"input_ids": ids})
        for form in ("direct", "fft"):
            contenders[f"torchscript {form}"] = lambda ids, m=build_torchscript(model, conv=form): m(torch.from_numpy(ids))

        rows = []
        rng = np.random.default_rng(0)
        for n in lengths:
            ids = rng.integers(0, 256, size=(1, n), dtype=np.int64)
            with torch.no_grad():
                row = {"length": n, **{name: timed(lambda f=fn: f(ids)) * 1e3 for name, fn in contenders.items()}}
            rows.append(row)
            print(" | ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)

    names = list(contenders)
    print(f"\nms per prefill, batch 1, {args.threads} threads, dim {cfg.dim}, depth {cfg.depth} (ratio = eager / contender)")
    print("| length | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for row in rows:
        eager = row["upstream eager"]
        cells = [f"{row[k]:.1f}" + ("" if k == "upstream eager" else f" ({eager / row[k]:.2f}x)") for k in names]
        print(f"| {row['length']} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "config": cfg.to_dict(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
