"""Markdown table and PNG plot of a `suite.py` run (results.json)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

EAGER = "upstream eager"
# the speed targets for the default ONNX export on the CPU provider (batch 1, 2 threads, dim 512 depth 4)
SHORT, SHORT_SPEEDUP, LONG, LONG_SHARE = 128, 1.5, 1024, 0.85


def write_markdown(results: dict, path: Path) -> str:
    m, cfg = results["machine"], results["config"]
    lines = [
        f"Machine: {m['cpu']}, {m['threads']} threads; float32 matmul {m['matmul_gflops']:.0f} GFLOP/s (median of "
        f"{m['samples']} samples taken between the rows, range {m['matmul_gflops_range'][0]:.0f}-{m['matmul_gflops_range'][1]:.0f}; "
        f"medians torch {m['matmul_gflops_torch']:.0f}, onnxruntime {m['matmul_gflops_onnxruntime']:.0f}), "
        f"memory {m['bandwidth_gbs']:.1f} GB/s; "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, Python {m['python']}. CUDA: {results['cuda']}.",
        f"Model: dim {cfg['dim']}, depth {cfg['depth']}, heads {cfg['heads']}, dim_dsconv {cfg['dim_dsconv']}, "
        f"num_tokens {cfg['num_tokens']}, batch 1; {results['flops_per_token'] / 1e6:.1f} MFLOP of matrix products per token.",
        "",
        "**Prefill**, ms (speed-up over upstream eager; share of the machine's matmul rate = compute floor / time, "
        f"floor = model FLOPs / {m['matmul_gflops']:.0f} GFLOP/s):",
        "",
    ]
    variants = set(_variant_names(results)[1])  # in a table of their own
    names = [n for n in results["prefill"][0]["ms"] if n not in variants]
    lines.append("| length | floor | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    for row in results["prefill"]:
        eager, floor = row["ms"][EAGER], row["compute_floor_ms"]
        cells = []
        for name in names:
            t = row["ms"][name]
            ratio = "" if name == EAGER else f"{eager / t:.2f}x, "
            cells.append(f"{t:.1f} ({ratio}{floor / t:.0%})")
        lines.append(f"| {row['length']} | {floor:.1f} | " + " | ".join(cells) + " |")
    lines += _ceiling_table(results) + _targets(results)
    lines += _variant_table(results)
    if results["decode"]:
        lines += ["", "**Decode** (greedy, after a prompt of `context` tokens; floor = weight bytes / bandwidth per step):", "",
                  "| context | gss-run tok/s | full recompute tok/s | speed-up | ms per token | weight floor ms | state per token |",
                  "|---|---|---|---|---|---|---|"]
        for r in results["decode"]:
            lines.append(f"| {r['context']} | {r['tokens_per_second']:.1f} | {r['full_recompute_tokens_per_second']:.2f} | {r['speedup']:.1f}x "
                         f"| {r['ms_per_token']:.2f} | {r['weight_floor_ms']:.2f} | {r['state_bytes_per_token'] / 1024:.1f} KiB |")
    longest = results["prefill"][-1]["length"]
    lines += ["", f"**Artifacts** (peak memory: a fresh process's peak RSS above its baseline for one prefill at length {longest}):", "",
              "| artifact | export s | size MB | peak memory MiB |", "|---|---|---|---|"]
    for name, a in results["artifacts"].items():
        peak = a.get("peak_memory", {})
        mem = f"{peak['model_and_activations_mib']:.0f}" if "model_and_activations_mib" in peak else peak.get("error", "")
        export = f"{a['export_seconds']:.1f}" if "export_seconds" in a else "-"
        size = f"{a['bytes'] / 1e6:.1f}" if "bytes" in a else "-"
        lines.append(f"| {name} | {export} | {size} | {mem} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def _ceiling_table(results: dict) -> list[str]:
    """What any convolution form could reach: the model with its convolution removed, and where the
    default export's time goes (weight products, which nothing removes, and the rest)."""
    base = _variant_names(results)[0]
    rows = [r for r in results["prefill"] if "no_conv_ms" in r]
    if not base or not rows:
        return []
    lines = ["", f"**The bound on any convolution form.** `without conv`: the default export with the convolution removed "
             "(out = u; not a model, only its cost counts): the weight products and the model's own LayerNorm, Gelu, "
             f"gating and residual passes. `weight products`: the part of `{base}`'s own run spent in them "
             "(onnxruntime's kernel profile, median run), and its largest other kernels.", "",
             "| length | eager | default export | without conv | bound vs eager | bound share of rate | weight products ms "
             "| largest other kernels ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k, eager, bound = r["auto_kernels_ms"], r["ms"][EAGER], r["no_conv_ms"]
        top = ", ".join(f"{op} {ms:.1f}" for op, ms in list(k["by_op"].items())[:3])
        lines.append(f"| {r['length']} | {eager:.1f} | {r['ms'][base]:.1f} ({eager / r['ms'][base]:.2f}x) | {bound:.1f} "
                     f"| {eager / bound:.2f}x | {r['compute_floor_ms'] / bound:.0%} | {k['weight products']:.1f} | {top} |")
    return lines


def _targets(results: dict) -> list[str]:
    """The three speed targets for the default export, each with what this run measured."""
    base = _variant_names(results)[0]
    if not base:
        return []
    rows = results["prefill"]
    speedup = {r["length"]: r["ms"][EAGER] / r["ms"][base] for r in rows}
    share = {r["length"]: r["compute_floor_ms"] / r["ms"][base] for r in rows}
    checks = []
    short = {n: v for n, v in speedup.items() if n <= SHORT}
    if short:
        n = min(short, key=short.get)
        checks.append((f">= {SHORT_SPEEDUP}x eager at lengths <= {SHORT}", f"{short[n]:.2f}x at {n}", short[n] >= SHORT_SPEEDUP))
    n = min(speedup, key=speedup.get)
    checks.append(("never slower than eager", f"{speedup[n]:.2f}x at {n}", speedup[n] >= 1.0))
    long = {n: v for n, v in share.items() if n >= LONG}
    if long:
        n = min(long, key=long.get)
        checks.append((f">= {LONG_SHARE:.0%} of the matmul rate at lengths >= {LONG}", f"{long[n]:.0%} at {n}", long[n] >= LONG_SHARE))
    return ["", f"**Targets** (`{base}`, the default export, in this run):", "", "| target | worst measured | met |", "|---|---|---|"] + [
        f"| {t} | {got} | {'yes' if ok else 'no'} |" for t, got, ok in checks]


def _variant_names(results: dict) -> tuple[str | None, list[str]]:
    """(the float32 `onnx auto (...)` contender, the reduced-precision exports of it)."""
    base = next((n for n in results["prefill"][0]["ms"] if n.startswith("onnx auto (")), None)
    return base, [n for n in results["prefill"][0]["ms"] if base and n.startswith("onnx auto ") and n != base]


def _variant_table(results: dict) -> list[str]:
    """fp16 / int8 exports of `auto` against its float32 export: prefill ms (speed-up) per length, and size."""
    base, names = _variant_names(results)
    if not names:
        return []
    lines = ["", "**Reduced precision** (`gss-export --dtype fp16`, `--quantize int8`, `--quantize int8 --int8-activations "
             f"per-tensor`), prefill ms (speed-up over the float32 export `{base}`):", "",
             "| length | float32 | " + " | ".join(n.removeprefix("onnx auto ") for n in names) + " |", "|---|---|" + "---|" * len(names)]
    for row in results["prefill"]:
        fp32 = row["ms"][base]
        lines.append(f"| {row['length']} | {fp32:.1f} | " + " | ".join(f"{row['ms'][n]:.1f} ({fp32 / row['ms'][n]:.2f}x)" for n in names) + " |")
    sizes = results["artifacts"]
    if all("bytes" in sizes.get(n, {}) for n in [base] + names):
        lines.append(f"| size MB (model + decoder) | {sizes[base]['bytes'] / 1e6:.1f} | "
                     + " | ".join(f"{sizes[n]['bytes'] / 1e6:.1f} ({sizes[n]['bytes'] / sizes[base]['bytes']:.2f}x)" for n in names) + " |")
    return lines


def write_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["length"] for r in results["prefill"]]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    variants = set(_variant_names(results)[1])
    names = list(results["prefill"][0]["ms"])
    colors = plt.cm.tab20(np.linspace(0, 1, 20))  # distinct colours for a dozen contenders
    for i, name in enumerate(names):  # the reduced-precision exports too (dotted): latency is what they trade for
        ax.plot(lengths, [r["ms"][name] for r in results["prefill"]], marker="o", markersize=4, label=name,
                color="black" if name == EAGER else colors[(2 * i) % 20 + (i * 2 >= 20)],
                linestyle=":" if name in variants else "-",
                linewidth=2.5 if name == EAGER or name.startswith("onnx auto (") else 1.3)
    if all("no_conv_ms" in r for r in results["prefill"]):
        ax.plot(lengths, [r["no_conv_ms"] for r in results["prefill"]], color="grey", linestyle="-.",
                label="bound: the default export without its convolution")
    ax.plot(lengths, [r["compute_floor_ms"] for r in results["prefill"]], "k--", label="float32 compute floor (FLOPs / matmul rate)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (batch 1)")
    ax.set_ylabel("prefill latency, ms")
    m = results["machine"]
    ax.set_title(f"GatedDsConvLM dim 512 depth 4, {m['threads']} threads, {m['cpu']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # re-render from a saved run: python benchmarks/report.py benchmarks/results
    out = Path(sys.argv[1])
    data = json.loads((out / "results.json").read_text())
    print(write_markdown(data, out / "results.md"))
    write_plot(data, out / "prefill.png")
