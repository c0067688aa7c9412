"""The documentation's plots: speed-up against length, drawn from the committed results JSON files.

    python benchmarks/plots.py [--results benchmarks/results] [--out docs/img]

Reads what the benchmarks wrote (nothing is measured here) and writes one PNG per run found:

- `prefill_speedup.png` (`results.json`, `suite.py`): every artifact's prefill speed-up over upstream
  eager by length, and the bound on any convolution form (the default export without its convolution);
- `long_context_speedup.png` (`long/results.json`, `suite.py --long`): the default export against eager
  up to 65,536 tokens, with the bound and the bound plus each transform floor;
- `families_speedup.png` (`families/results.json`, `families.py`): the recurrent families' prompt path
  and forward against eager;
- `int8_speedup.png` (`int8/{native,avx2}/results.json`, `int8.py`): int8 exports against float32;
- `serve_scaling.png` (`serve/results.json`, `serve.py`): gss-serve's throughput by concurrent streams.

Speed-ups are on a linear axis (1.0 = as fast as the baseline, drawn as a line), lengths on a log axis.
A missing results file is skipped with a note. Needs matplotlib (the `bench` extra).
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

EAGER = "upstream eager"
DEFAULT = "onnx auto (switch)"


def _figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    ax.set_title(textwrap.fill(title, 90), fontsize=9, loc="left")
    return plt, fig, ax


def _finish(plt, fig, ax, path: Path, xlabel: str, ylabel: str, lengths: list[int]) -> None:
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([f"{n:,}" for n in lengths], rotation=45 if len(lengths) > 6 else 0, fontsize=8)
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine(m: dict) -> str:
    return f"{m['cpu']}, {m['threads']} threads"


def prefill(results: dict, path: Path) -> None:
    """Speed-up over upstream eager = eager ms / artifact ms, per length (suite.py)."""
    rows = results["prefill"]
    lengths = [r["length"] for r in rows]
    plt, fig, ax = _figure(f"Prefill speed-up over upstream eager (GatedDsConvLM dim 512 depth 4, batch 1; {_machine(results['machine'])})")
    names = [n for n in rows[0]["ms"] if n != EAGER]
    others = iter(c for i, c in enumerate(plt.cm.tab20.colors) if i not in (6, 7, 14, 15))  # no reds, no greys
    for name in names:
        reduced = name.startswith("onnx auto ") and name != DEFAULT
        ax.plot(lengths, [r["ms"][EAGER] / r["ms"][name] for r in rows], marker="o", markersize=3.5,
                label=name + (" (default export)" if name == DEFAULT else ""),
                color="tab:red" if name == DEFAULT else next(others),
                linestyle=":" if reduced else "-", linewidth=2.8 if name == DEFAULT else 1.2)
    if all("no_conv_ms" in r for r in rows):
        ax.plot(lengths, [r["ms"][EAGER] / r["no_conv_ms"] for r in rows], color="grey", linestyle="-.", linewidth=1.5,
                label="bound: the default export without its convolution")
    _finish(plt, fig, ax, path, "sequence length (tokens)", "speed-up over upstream eager (x)", lengths)


def long_context(results: dict, path: Path) -> None:
    """The default export, the no-convolution bound and bound + floors, as speed-up over eager (long_context.py)."""
    rows = results["prefill"]
    lengths = [r["length"] for r in rows]
    plt, fig, ax = _figure(f"Long context: prefill speed-up over upstream eager, dim 512 depth 4, {_machine(results['machine'])}")
    eager = [r["ms"][EAGER] for r in rows]
    bound = [r["ms"]["without conv (bound)"] for r in rows]
    series = [
        ("default export (model.onnx)", [r["ms"]["default export"] for r in rows], "tab:red", "-", 2.8),
        ("bound: without its convolution", bound, "grey", "-.", 1.5),
        ("bound + the form's transform floor", [b + r["ms"]["form floor"] for b, r in zip(bound, rows)], "tab:blue", "--", 1.2),
        ("bound + the best factorization's floor", [b + r["ms"]["best floor"] for b, r in zip(bound, rows)], "tab:green", ":", 1.2),
    ]
    for label, ms, color, style, width in series:
        ax.plot(lengths, [e / t for e, t in zip(eager, ms)], marker="o", markersize=3.5, label=label, color=color,
                linestyle=style, linewidth=width)
    _finish(plt, fig, ax, path, "sequence length (tokens)", "speed-up over upstream eager (x)", lengths)


def families(results: dict, path: Path) -> None:
    """GatedStateSpacesLM and GatedExponentialSmoothingLM: prompt path and forward against eager (families.py)."""
    plt, fig, ax = _figure(f"Recurrent families: prompt speed-up over upstream eager, dim 512 depth 4, "
                           f"{results['machine']}, {results['threads']} threads")
    lengths: list[int] = []
    for family, color in zip(results["families"].values(), ("tab:purple", "tab:orange")):
        rows = family["prompt"]
        lengths = [r["length"] for r in rows]
        name = family["upstream_class"]
        ax.plot(lengths, [r["upstream_ms"] / r["prompt_ms"] for r in rows], marker="o", markersize=3.5, color=color,
                linewidth=2.2, label=f"{name}: gss-run's prompt (state and last logits)")
        ax.plot(lengths, [r["upstream_ms"] / r["forward_ms"] for r in rows], marker="s", markersize=3, color=color,
                linestyle="--", linewidth=1.2, label=f"{name}: model.onnx forward")
    _finish(plt, fig, ax, path, "prompt length (tokens)", "speed-up over upstream eager (x)", lengths)


def int8(runs: dict[str, dict], path: Path) -> None:
    """int8 exports' prefill against the float32 export, per CPU seen (int8.py)."""
    first = next(iter(runs.values()))
    plt, fig, ax = _figure(f"int8 prefill speed-up over the float32 export, dim 512 depth 4, {first['machine']['cpu']}, "
                           f"{first['machine']['threads']} threads")
    lengths: list[int] = []
    styles = {"native": "-", "avx2": "--"}
    seen = {"native": "AVX-512 VNNI", "avx2": "AVX2 only"}
    for cpu, results in runs.items():
        rows = results["prefill"]
        lengths = [r["length"] for r in rows]
        for name, color in zip([n for n in rows[0]["ms"] if n != "float32"], ("tab:red", "tab:blue", "tab:grey")):
            ax.plot(lengths, [r["ms"]["float32"] / r["ms"][name] for r in rows], marker="o", markersize=3.5, color=color,
                    linestyle=styles.get(cpu, "-."), linewidth=2.2 if name == "int8" else 1.2,
                    label=f"{name}, CPU seen as {seen.get(cpu, cpu)}")
    _finish(plt, fig, ax, path, "sequence length (tokens)", "speed-up over the float32 export (x)", lengths)


def serve(results: dict, path: Path) -> None:
    """Throughput by concurrent streams, against one stream served alone (serve.py)."""
    rows = results["rows"]
    streams = [r["concurrency"] for r in rows]
    one = rows[0]["one_after_another"]["tokens_per_second"]
    loop_one = rows[0]["step_loop_alone_tokens_per_second"]
    plt, fig, ax = _figure(f"gss-serve throughput ({results['family']}, {results['prompt_tokens']}-token prompts, "
                           f"{results['new_tokens']} new tokens), {results['cpu']}, {results['threads']} threads")
    ax.plot(streams, [r["concurrent"]["tokens_per_second"] / one for r in rows], marker="o", color="tab:red", linewidth=2.2,
            label="gss-serve, concurrent streams over HTTP")
    ax.plot(streams, [r["step_loop_alone_tokens_per_second"] / loop_one for r in rows], marker="s", color="grey",
            linestyle="-.", label="the step loop alone (no HTTP)")
    ax.plot(streams, [r["one_after_another"]["tokens_per_second"] / one for r in rows], marker="^", color="tab:blue",
            linestyle=":", label="the same requests one after another")
    _finish(plt, fig, ax, path, "concurrent streams", "tokens/s against one stream (x)", streams)


def _load(path: Path) -> dict | None:
    if not path.is_file():
        print(f"skipped: no {path}")
        return None
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for source, draw, name in [
        ("results.json", prefill, "prefill_speedup.png"),
        ("long/results.json", long_context, "long_context_speedup.png"),
        ("families/results.json", families, "families_speedup.png"),
        ("serve/results.json", serve, "serve_scaling.png"),
    ]:
        results = _load(args.results / source)
        if results is not None:
            draw(results, args.out / name)
            written.append(name)
    runs = {cpu: r for cpu in ("native", "avx2") if (r := _load(args.results / "int8" / cpu / "results.json")) is not None}
    if runs:
        int8(runs, args.out / "int8_speedup.png")
        written.append("int8_speedup.png")
    print(f"wrote {', '.join(written) or 'nothing'} to {args.out}")


if __name__ == "__main__":
    main()
