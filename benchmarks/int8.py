"""Int8 against float32 on this CPU: prefill and decode speed, and quality on held-out text.

    python benchmarks/int8.py [--cpu native|avx2] [--lengths 1,16,64,128,256,512,1024,2048,4096]
                              [--contexts 128,512,2048] [--threads 2] [--out benchmarks/results/int8]
    python benchmarks/suite.py --int8 [same options]

`--cpu avx2` reruns itself with `avx2_only.c` preloaded: CPUID hides AVX-512, AVX-VNNI and AMX, so
onnxruntime picks the kernels of an AVX2-only CPU (e.g. AMD Zen 3) on this machine's hardware, and
the export's CPU probe sees that CPU. Needs a C compiler and CPUID faulting (Linux, `cpuid_fault`).

Speed: dim 512, depth 4, heads 8, dim_dsconv 512, num_tokens 256, random weights, batch 1. The
float32 default export (`gss-export`) against `--quantize int8` (the default `auto` activations,
and `per-row` / `per-tensor`), every length timing each in turn (median of repeats); decode is
gss-run's Generator, ms per greedy token after a prompt of `context` tokens.
Quality: the example checkpoint exported with each int8 setting, checked as `gss-export` checks
it: top-1 agreement and mean KL against float32 eager on the held-out split, for model.onnx and
the decoder.

Writes OUT/<cpu>/results.json and results.md (cpu: native or avx2).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from common import cpu_name, reference_models, session_options, timed
from gss_export.checkpoint import load_checkpoint
from gss_export.export import export_model
from gss_export.variants.int8_products import cpu_features, resolve_target
from gss_export.tolerances import QualityThreshold
from gss_export.variants.request import VariantRequest
from gss_runtime.generate import Generator

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "byte_lm" / "model.safetensors"
SETTINGS = {"int8": "auto", "int8 per-row": "per-row", "int8 per-tensor": "per-tensor"}
TARGETS = {"speed": 1.3, "from_length": 128, "top1": 0.95, "kl": 0.02}
MASKED = "GSS_BENCH_AVX2_ONLY"


def rerun_avx2_only() -> None:
    """Replace this process by itself with avx2_only.so preloaded (built here with cc)."""
    if os.environ.get(MASKED) == "1":
        return
    if "cpuid_fault" not in Path("/proc/cpuinfo").read_text():
        sys.exit("--cpu avx2 needs CPUID faulting (the cpuid_fault flag in /proc/cpuinfo), which this CPU lacks")
    shim = Path(tempfile.mkdtemp(prefix="gss-avx2-")) / "avx2_only.so"
    built = subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(shim), str(HERE / "avx2_only.c")], capture_output=True, text=True)
    if built.returncode != 0:
        sys.exit(f"--cpu avx2: cannot build avx2_only.so: {built.stderr.strip()[:300]}")
    env = {**os.environ, "LD_PRELOAD": str(shim), MASKED: "1"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def quality_rows() -> list[dict]:
    """Top-1 / KL of model.onnx and the decoder for each int8 setting, on the example checkpoint."""
    model = load_checkpoint(EXAMPLE).model
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, activations in SETTINGS.items():
            out = Path(tmp) / label.replace(" ", "_")
            anything = QualityThreshold(min_top1=0.0, max_kl=float("inf"))  # measure, whatever the result
            export_model(model, "onnx", out, variant=VariantRequest("int8", anything, int8_activations=activations))
            config = json.loads((out / "config.json").read_text())
            model_check, decoder_check = config["validation"], config["decoder_validation"]
            rows.append({"setting": label, "top1": model_check["top1"], "kl": model_check["kl"],
                         "top1_decoder": decoder_check["top1"], "kl_decoder": decoder_check["kl"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", choices=("native", "avx2"), default="native")
    parser.add_argument("--lengths", default="1,16,64,128,256,512,1024,2048,4096")
    parser.add_argument("--contexts", default="128,512,2048")
    parser.add_argument("--decode-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "int8")
    args = parser.parse_args(argv)
    if args.cpu == "avx2":
        rerun_avx2_only()
    lengths = [int(x) for x in args.lengths.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")] if args.contexts else []
    torch.set_num_threads(args.threads)
    target = resolve_target("auto")
    machine = {"cpu": cpu_name(), "seen_as": args.cpu, "cpu_features": cpu_features(), "int8_target": target["target"],
               "onnxruntime": ort.__version__, "torch": torch.__version__, "python": platform.python_version(), "threads": args.threads}
    print(json.dumps(machine), flush=True)
    if args.cpu == "avx2" and "AVX512F" in machine["cpu_features"]:
        sys.exit("avx2_only.so did not hide AVX-512 from this process")
    results = {"machine": machine, "targets": TARGETS, "prefill": [], "decode": []}

    ours, _ = reference_models(max(lengths + [c + args.decode_tokens + 1 for c in contexts]))
    with tempfile.TemporaryDirectory() as tmp:
        folders = {"float32": Path(tmp) / "fp32"}
        export_model(ours, "onnx", folders["float32"], validate=False)
        for label, activations in SETTINGS.items():
            folders[label] = Path(tmp) / label.replace(" ", "_")
            export_model(ours, "onnx", folders[label], validate=False, variant=VariantRequest("int8", int8_activations=activations))
        options = session_options(args.threads)
        sessions = {k: ort.InferenceSession(str(f / "model.onnx"), options, providers=["CPUExecutionProvider"]) for k, f in folders.items()}
        rng = np.random.default_rng(0)
        for n in lengths:
            ids = rng.integers(0, 256, size=(1, n), dtype=np.int64)
            row = {"length": n, "ms": {k: timed(lambda s=s: s.run(None, {"input_ids": ids})) * 1e3 for k, s in sessions.items()}}
            results["prefill"].append(row)
            print(f"n={n}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row["ms"].items()), flush=True)
        gens = {k: Generator(folders[k], provider="cpu", threads=args.threads) for k in ("float32", "int8")}
        for context in contexts:
            prompt = rng.integers(0, 256, size=context).tolist()
            row = {"context": context, "ms_per_token": {}}
            for _ in range(2):  # in turn, best of two: one run's scheduling noise is not the model's
                for k, gen in gens.items():
                    gen.generate(prompt, 2)
                    made = gen.generate(prompt, args.decode_tokens)
                    ms = made.decode_seconds / made.steps * 1e3
                    row["ms_per_token"][k] = min(ms, row["ms_per_token"].get(k, ms))
            results["decode"].append(row)
            print(json.dumps(row), flush=True)
    print("quality on the example checkpoint...", flush=True)
    results["quality"] = quality_rows()
    out = args.out / args.cpu
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    markdown = report(results)
    (out / "results.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}")


def report(results: dict) -> str:
    """The markdown tables and the targets, from `results`."""
    m, t = results["machine"], results["targets"]
    seen = "all of its instruction sets" if m["seen_as"] == "native" else "AVX-512, AVX-VNNI and AMX hidden (avx2_only.c)"
    lines = [f"Machine: {m['cpu']}, seen with {seen}: {', '.join(m['cpu_features'])}; int8 target probed: {m['int8_target']}; "
             f"{m['threads']} threads; onnxruntime {m['onnxruntime']}, torch {m['torch']}.", "",
             "**Prefill**, ms (speed-up over the float32 default export):", "",
             "| length | float32 | " + " | ".join(SETTINGS) + " |", "|---" * (len(SETTINGS) + 2) + "|"]
    for row in results["prefill"]:
        base = row["ms"]["float32"]
        lines.append(f"| {row['length']} | {base:.1f} | " + " | ".join(f"{row['ms'][k]:.1f} ({base / row['ms'][k]:.2f}x)" for k in SETTINGS) + " |")
    if results["decode"]:
        lines += ["", "**Decode**, ms per token after the context (gss-run's Generator):", "",
                  "| context | float32 | int8 | speed-up |", "|---|---|---|---|"]
        for row in results["decode"]:
            ms = row["ms_per_token"]
            lines.append(f"| {row['context']} | {ms['float32']:.2f} | {ms['int8']:.2f} | {ms['float32'] / ms['int8']:.2f}x |")
    lines += ["", "**Quality** on the example checkpoint's held-out text (8 windows of 512), against float32 eager:", "",
              "| setting | top-1 model / decoder | mean KL model / decoder |", "|---|---|---|"]
    for row in results["quality"]:
        lines.append(f"| {row['setting']} | {row['top1']:.4f} / {row['top1_decoder']:.4f} | {row['kl']:.4f} / {row['kl_decoder']:.4f} |")
    speed = [row["ms"]["float32"] / row["ms"]["int8"] for row in results["prefill"] if row["length"] >= t["from_length"]]
    decode = [row["ms_per_token"]["float32"] / row["ms_per_token"]["int8"] for row in results["decode"]]
    default = next(row for row in results["quality"] if row["setting"] == "int8")
    checks = [
        (f">= {t['speed']}x float32 prefill from {t['from_length']} tokens", f"{min(speed):.2f}x" if speed else "-", bool(speed) and min(speed) >= t["speed"]),
        (f"top-1 >= {t['top1']} (model, decoder)", f"{min(default['top1'], default['top1_decoder']):.4f}",
         min(default["top1"], default["top1_decoder"]) >= t["top1"]),
        (f"mean KL <= {t['kl']} (model, decoder)", f"{max(default['kl'], default['kl_decoder']):.4f}", max(default["kl"], default["kl_decoder"]) <= t["kl"]),
        ("decode no slower than float32", f"{min(decode):.2f}x" if decode else "-", bool(decode) and min(decode) >= 1.0),
    ]
    lines += ["", "**Targets** (the default `--quantize int8`):", "", "| target | worst measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {worst} | {'yes' if ok else 'no'} |" for name, worst, ok in checks]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
