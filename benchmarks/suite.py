"""The benchmark: every artifact against upstream eager, side by side in one run, against the machine's limits.

    python benchmarks/suite.py [--lengths 1,16,64,128,256,512,1024,2048,4096] [--contexts 128,512,2048]
                               [--threads 2] [--out benchmarks/results]
    python benchmarks/suite.py --long [options of benchmarks/long_context.py]   # up to 65,536 tokens
    python benchmarks/suite.py --int8 [--cpu native|avx2] [options of benchmarks/int8.py]

Model: dim 512, depth 4, heads 8, dim_dsconv 512, num_tokens 256, random weights, batch 1,
exported with max_seq_len = the longest length. In one process, on the same threads:

- the machine: float32 matrix-multiply rate (torch and onnxruntime, the better one counts) and
  memory bandwidth, sampled before every length and summarised by the median (one sample swings);
- prefill latency per length for upstream eager, ONNX on onnxruntime's CPU provider (every conv
  form and `auto`), TorchScript (`auto` and `monarch`), the torch.export archive (pt2) and its
  AOTInductor compilation (aoti), and where a GPU is usable, onnxruntime's
  CUDA provider against eager CUDA; each length times every contender in turn (median of repeats),
  and each time is also given as a fraction of the compute floor (model FLOPs / matmul rate);
- the bound on any convolution form: the default export with the convolution removed (out = u),
  and where the default export's time goes (onnxruntime's kernel profile: the model's weight
  products against the rest);
- decode tokens per second (gss-run's decoder with state against upstream full recompute), each
  step against the weight-streaming floor (weight bytes / bandwidth);
- the reduced-precision exports of `auto` (fp16, int8, int8 with one activation scale per tensor
  everywhere) beside it: prefill latency and size, with the ratio to the float32 export;
- export time and artifact size; peak memory of a prefill at the longest length (a fresh process
  per contender, so one's peak cannot hide another's).

Writes OUT/results.json, OUT/results.md and OUT/prefill.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from common import MachineLimits, cpu_name, matmul_flops_per_token, peak_memory, reference_models, session_options, timed, weight_bytes
from decode import measure_decode
from kernel_time import export_without_conv, kernel_breakdown
from report import write_markdown, write_plot

from gss_export.artifacts import save_onnx
from gss_export.conv.forms import AUTO_FORM
from gss_export.export import export_model
from gss_export.targets.onnx import build_onnx
from gss_export.targets.aoti import load_aoti
from gss_export.targets.pt2 import load_pt2_program
from gss_export.targets.torchscript import build_torchscript, save_torchscript
from gss_export.variants.request import VariantRequest

# `auto` and its reduced-precision exports (gss-export --dtype fp16 / --quantize int8 [--int8-activations per-tensor])
VARIANTS = {"": {}, "fp16": {}, "int8": {}, "int8 per-tensor": {"int8_activations": "per-tensor"}}  # "": float32

def cuda_contenders(model_path: Path, upstream, threads: int) -> tuple[dict, str | None]:
    """Eager CUDA and onnxruntime's CUDA provider, or the reason they cannot run here."""
    if not torch.cuda.is_available():
        return {}, "no CUDA device visible to torch"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {}, "this onnxruntime has no CUDA provider"
    session = ort.InferenceSession(str(model_path), session_options(threads), providers=["CUDAExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return {}, "onnxruntime could not start its CUDA provider"
    gpu = copy.deepcopy(upstream).to("cuda")  # the CPU model keeps serving the CPU rows

    def eager_cuda(ids):
        gpu(torch.from_numpy(ids).cuda())
        torch.cuda.synchronize()

    return {"upstream eager cuda": eager_cuda, "onnx auto cuda": lambda ids: session.run(None, {"input_ids": ids})}, None


def main() -> None:
    if "--long" in sys.argv[1:]:  # the long-context run has its own lengths and rows
        from long_context import main as long_main

        return long_main([a for a in sys.argv[1:] if a != "--long"])
    if "--int8" in sys.argv[1:]:  # int8 against float32, on this CPU or as an AVX2-only one (--cpu avx2)
        from int8 import main as int8_main

        return int8_main([a for a in sys.argv[1:] if a != "--int8"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1,16,64,128,256,512,1024,2048,4096")
    parser.add_argument("--contexts", default="128,512,2048")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")] if args.contexts else []
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    print("measuring the machine...", flush=True)
    limits = MachineLimits(args.threads)
    print(json.dumps(limits.sample()), flush=True)
    machine = {"cpu": cpu_name(), "torch": torch.__version__, "onnxruntime": ort.__version__, "python": platform.python_version()}

    limit = max(lengths + [c + args.decode_tokens + 1 for c in contexts])
    ours, upstream = reference_models(limit)
    flops_per_token = matmul_flops_per_token(ours.config)
    options = session_options(args.threads)
    results = {"machine": machine, "config": ours.config.to_dict(), "flops_per_token": flops_per_token,
               "weight_bytes": weight_bytes(ours), "artifacts": {}, "prefill": [], "decode": []}
    contenders = {"upstream eager": lambda ids: upstream(torch.from_numpy(ids))}
    paths = {"upstream eager": ("upstream", json.dumps(ours.config.upstream_kwargs()))}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for form in ("direct", "fft", "monarch"):
            start = time.perf_counter()
            path = tmp / f"onnx_{form}.onnx"
            save_onnx(build_onnx(ours, conv=form), path)
            name = f"onnx {form}"
            results["artifacts"][name] = {"export_seconds": time.perf_counter() - start, "bytes": path.stat().st_size}
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            contenders[name] = lambda ids, s=session: s.run(None, {"input_ids": ids})
            paths[name] = ("onnx", str(path))
        auto_dir = tmp / "auto"
        for label, request in VARIANTS.items():  # what `gss-export --no-validate` does, decoder included
            start = time.perf_counter()
            folder = tmp / f"auto_{label.replace(' ', '_')}" if label else auto_dir
            export_model(ours, "onnx", folder, validate=False, variant=VariantRequest(label.split()[0], **request) if label else None)
            name = f"onnx auto {label}" if label else f"onnx auto ({AUTO_FORM['onnx']})"
            results["artifacts"][name] = {"export_seconds": time.perf_counter() - start,
                                          "bytes": sum(p.stat().st_size for p in folder.iterdir() if p.suffix == ".onnx")}
            session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
            contenders[name] = lambda ids, s=session: s.run(None, {"input_ids": ids})
            paths[name] = ("onnx", str(folder / "model.onnx"))
        for fmt in ("pt2", "aoti"):  # torch.export's archive and its AOTInductor compilation (TorchScript's successors)
            start = time.perf_counter()
            folder = tmp / fmt
            export_model(ours, fmt, folder, validate=False)
            name = f"{fmt} ({AUTO_FORM[fmt]})"
            results["artifacts"][name] = {"export_seconds": time.perf_counter() - start, "bytes": (folder / "model.pt2").stat().st_size}
            forward = (load_pt2_program if fmt == "pt2" else load_aoti)(folder / "model.pt2")
            contenders[name] = lambda ids, f=forward: f(torch.from_numpy(ids))
            paths[name] = (fmt, str(folder / "model.pt2"))
        for form in (AUTO_FORM["torchscript"], "monarch"):
            start = time.perf_counter()
            path = tmp / f"ts_{form}.pt"
            scripted = build_torchscript(ours, conv=form)
            save_torchscript(scripted, path, {})
            name = f"torchscript {form}" + (" (auto)" if form == AUTO_FORM["torchscript"] else "")
            results["artifacts"][name] = {"export_seconds": time.perf_counter() - start, "bytes": path.stat().st_size}
            contenders[name] = lambda ids, m=scripted: m(torch.from_numpy(ids))
            paths[name] = ("torchscript", str(path))
        bound_path = tmp / "no_conv.onnx"  # not a model: the bound on what any conv form could reach
        export_without_conv(ours, str(bound_path))
        bound = ort.InferenceSession(str(bound_path), options, providers=["CPUExecutionProvider"])
        gpu, reason = cuda_contenders(auto_dir / "model.onnx", upstream, args.threads)
        contenders.update(gpu)
        results["cuda"] = "measured" if gpu else f"skipped: {reason}"

        rng = np.random.default_rng(0)
        for n in lengths:
            ids = rng.integers(0, 256, size=(1, n), dtype=np.int64)
            rates = limits.sample()
            row = {"length": n, "ms": {}}
            with torch.inference_mode():
                for name, fn in contenders.items():
                    row["ms"][name] = timed(lambda f=fn: f(ids)) * 1e3
            row["no_conv_ms"] = timed(lambda: bound.run(None, {"input_ids": ids})) * 1e3
            row["auto_kernels_ms"] = kernel_breakdown(str(auto_dir / "model.onnx"), ids, args.threads)
            results["prefill"].append(row)
            print(f"n={n}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row["ms"].items())
                  + f"; without conv {row['no_conv_ms']:.1f} ms, auto's weight products {row['auto_kernels_ms']['weight products']:.1f} ms; "
                  + json.dumps(rates), flush=True)
        limits.sample()
        machine.update(limits.summary())  # results["machine"] is this dict
        for row in results["prefill"]:  # against the median rate of the whole run
            row["compute_floor_ms"] = flops_per_token * row["length"] / (machine["matmul_gflops"] * 1e9) * 1e3

        if contexts:
            print("decode...", flush=True)
            floor = results["weight_bytes"] / (machine["bandwidth_gbs"] * 1e9)
            for row in measure_decode(ours, upstream, contexts, args.decode_tokens, args.threads, auto_dir):
                row["weight_floor_ms"] = floor * 1e3
                results["decode"].append(row)
                print(json.dumps(row), flush=True)

        print("peak memory (a fresh process each)...", flush=True)
        for name, (kind, path) in paths.items():
            results["artifacts"].setdefault(name, {})["peak_memory"] = peak_memory(kind, path, max(lengths), args.threads)

    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    markdown = write_markdown(results, args.out / "results.md")
    write_plot(results, args.out / "prefill.png")
    print(markdown)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'prefill.png'}")


if __name__ == "__main__":
    main()
