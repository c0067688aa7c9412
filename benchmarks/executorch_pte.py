"""The ExecuTorch program (`model.pte`) against onnxruntime's `model.onnx`, in one run.

    python benchmarks/executorch_pte.py [--lengths 128,512,2048] [--contexts 128,2048] [--max-seq-len 2048]
                                    [--max-batch 4] [--threads 2] [--families dsconv,gss,mhesa] [--out benchmarks/results/executorch]

The reference models (dim 512, depth 4, num_tokens 256; random weights), exported to both. Per family:
the forward at batch 1 and each length (the best of `--repeats`, taken in turn, onnxruntime's threads
stopping their spin at the end of each call), with the .pte's max relative error against onnxruntime;
ms per greedy token after a prompt of each context (onnxruntime: gss-run's Decoder; the .pte: its step
method through the Python driver, which concatenates the new entries onto the past as an app would);
file sizes and the working memory ExecuTorch planned per method. ExecuTorch runs XNNPACK's threadpool,
one thread per core (`--threads` sets onnxruntime's to match on this 2-core machine).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from backends import model_of
from common import best_of, cpu_name, write_results
from gss_export.export import export_model
from gss_export.targets.executorch import PteProgram
from gss_runtime.backends import SPIN_IN_CALL, open_graph
from gss_runtime.decoder import Decoder


def forward_rows(onnx: Path, pte: PteProgram, lengths: list[int], threads: int, repeats: int) -> list[dict]:
    graph = open_graph(onnx / "model.onnx", "onnxruntime", "cpu", threads, SPIN_IN_CALL)
    rng, rows = np.random.default_rng(0), []
    for n in lengths:
        ids = rng.integers(0, 256, size=(1, n))
        want = graph.run({"input_ids": ids})[0]
        row = {"length": n, "onnxruntime_ms": float("inf"), "pte_ms": float("inf")}
        for _ in range(repeats):
            row["onnxruntime_ms"] = min(row["onnxruntime_ms"], best_of(lambda: graph.run({"input_ids": ids}), 1) * 1e3)
            row["pte_ms"] = min(row["pte_ms"], best_of(lambda: pte.forward(ids), 1) * 1e3)
        row["pte_rel"] = float(np.abs(pte.forward(ids) - want).max() / np.abs(want).max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def per_token(decoder, prompt: list[int], steps: int) -> float:
    """Median ms of a greedy step after `prompt` (a gss_runtime.Decoder or the .pte's TorchDecoder)."""
    logits, state = decoder.feed(np.asarray([prompt], np.int64), decoder.empty_state([0]))
    token, times = [int(logits[0, -1].argmax())], []
    for _ in range(steps + 2):
        start = time.perf_counter()
        logits, state = decoder.step(token, state)
        times.append(time.perf_counter() - start)
        token = [int(logits[0].argmax())]
    return float(np.median(times[2:]) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="128,512,2048")
    parser.add_argument("--contexts", default="128,2048")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--families", default="dsconv,gss,mhesa")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "executorch")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    torch.set_num_threads(args.threads)
    results = {"machine": cpu_name(), "threads": args.threads, "max_seq_len": args.max_seq_len, "max_batch": args.max_batch,
               "families": {}}
    for family in args.families.split(","):
        model = model_of(family, args.max_seq_len)
        with tempfile.TemporaryDirectory() as tmp:
            onnx, pte_dir = Path(tmp) / "onnx", Path(tmp) / "pte"
            export_model(model, "onnx", onnx, validate=False)
            start = time.perf_counter()
            settings = export_model(model, "executorch", pte_dir, validate=False, max_batch=args.max_batch).settings
            lowered_s = time.perf_counter() - start
            pte = PteProgram(pte_dir / "model.pte", model.config)
            rng = np.random.default_rng(1)
            decode = []
            for context in contexts:
                prompt = rng.integers(0, 256, size=context - args.steps - 4).tolist()
                decode.append({"context": context,
                               "onnxruntime_ms": per_token(Decoder(onnx, provider="cpu", threads=args.threads), prompt, args.steps),
                               "pte_ms": per_token(pte.decoder(), prompt, args.steps)})
                print(json.dumps(decode[-1]), flush=True)
            results["families"][family] = {
                "forward": forward_rows(onnx, pte, lengths, args.threads, args.repeats), "decode": decode,
                "pte_bytes": settings["bytes"], "onnx_bytes": (onnx / "model.onnx").stat().st_size, "lowering_seconds": lowered_s,
                "planned_bytes": {m: r["planned_bytes"] for m, r in settings["lowering"].items()},
                "outside_xnnpack": {m: r["outside_xnnpack"] for m, r in settings["lowering"].items()},
            }
        print(markdown({**results, "families": {family: results["families"][family]}}), flush=True)
    write_results(args.out, results, markdown(results))


def markdown(results: dict) -> str:
    lines = [f"# model.pte (ExecuTorch, XNNPACK) against model.onnx (onnxruntime): {results['machine']}, "
             f"{results['threads']} threads, batch 1", "",
             f"Programs bounded at batch {results['max_batch']} and {results['max_seq_len']} tokens. "
             "x: onnxruntime's time over the .pte's (above 1x the .pte is faster).", "",
             "| family | forward 128 / 512 / 2048 tokens: ms (x) | max rel error | decode ms per token (x) at "
             "128 / 2048 | .pte MB / .onnx MB | planned MiB: forward, step, prefill |", "|---|---|---|---|---|---|"]
    for family, r in results["families"].items():
        fwd = " / ".join(f"{row['pte_ms']:.1f} ({row['onnxruntime_ms'] / row['pte_ms']:.2f}x)" for row in r["forward"])
        dec = " / ".join(f"{row['pte_ms']:.2f} ({row['onnxruntime_ms'] / row['pte_ms']:.2f}x)" for row in r["decode"])
        plan = ", ".join(f"{r['planned_bytes'][m] / 2**20:.0f}" for m in ("forward", "step", "prefill"))
        lines.append(f"| {family} | {fwd} | {max(row['pte_rel'] for row in r['forward']):.1e} | {dec} | "
                     f"{r['pte_bytes'] / 1e6:.1f} / {r['onnx_bytes'] / 1e6:.1f} | {plan} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
