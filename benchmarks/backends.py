"""onnxruntime against OpenVINO (f32 and bf16) on the same exported files, every family, in one run.

    python benchmarks/backends.py [--lengths 1,16,128,1024,4096,16384] [--long] [--contexts 128,2048,16384]
                                  [--threads 2] [--families dsconv,gss,mhesa] [--out benchmarks/results/backends]

The reference models (dim 512, depth 4, num_tokens 256; GatedDsConvLM: heads 8, dim_dsconv 512; the
recurrent families with upstream's defaults), random weights, exported to ONNX once. Per family:

- prefill: `model.onnx` at batch 1 and each length, on onnxruntime, OpenVINO f32 and OpenVINO bf16, timed
  in turn (best of `--repeats` after a warm-up), each one's max relative error against onnxruntime's
  logits (which are within ~1e-6 of eager: the parity tests);
- decode: ms per token of batch-1 greedy steps after a prompt of each context (decoder.onnx, the state
  reserved for the steps, as gss-run opens it), on the three, one backend after another;
- bf16 quality: top-1 agreement and mean KL against float32 eager on the example corpus's held-out
  text (8 windows of 512), for model.onnx and decoder.onnx, and whether they pass the bar in
  gss_export/tolerances.py (what `gss-export --openvino` records; bf16 is refused below it).

`--long` adds 65,536 tokens (GatedDsConvLM's maximum in the other benchmarks). Writes OUT/results.json
and OUT/results.md, with the fastest choice that passes its quality bar for each row.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import best_of, cpu_name, reference_models, write_results
from families import models as family_models
from gss_export.export import export_model
from gss_export.tolerances import QUALITY
from gss_export.variants import quality
from gss_runtime.backends import SPIN_IN_CALL, open_graph
from gss_runtime.backends.openvino import has_bf16, version
from gss_runtime.decoder import Decoder

KINDS = (("onnxruntime", "f32"), ("openvino", "f32"), ("openvino", "bf16"))
NAMES = {"onnxruntime/f32": "onnxruntime", "openvino/f32": "OpenVINO f32", "openvino/bf16": "OpenVINO bf16"}


def model_of(family: str, max_seq_len: int):
    if family == "dsconv":
        return reference_models(max_seq_len)[0]
    return family_models(family, max_seq_len)[0]


def prefill_rows(folder: Path, lengths: list[int], threads: int, repeats: int, kinds) -> list[dict]:
    # onnxruntime's threads stop spinning when its call returns: spinning on, they would take the cores from
    # the OpenVINO call timed right after (measured: OpenVINO at 0.5x instead of 1.0x at 128 tokens)
    graphs = {f"{b}/{p}": open_graph(folder / "model.onnx", b, "cpu", threads, SPIN_IN_CALL, p) for b, p in kinds}
    rng, rows = np.random.default_rng(0), []
    for n in lengths:
        ids = rng.integers(0, 256, size=(1, n))
        want = graphs["onnxruntime/f32"].run({"input_ids": ids})[0]
        row = {"length": n}
        for _ in range(repeats):  # in turn: a drift of the machine touches every backend alike
            for key, graph in graphs.items():
                seconds = best_of(lambda: graph.run({"input_ids": ids}), 1)
                row[f"{key}_ms"] = min(row.get(f"{key}_ms", float("inf")), seconds * 1e3)
        for key, graph in graphs.items():
            got = graph.run({"input_ids": ids})[0]
            row[f"{key}_rel"] = float(np.abs(got - want).max() / np.abs(want).max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def decode_rows(folder: Path, contexts: list[int], threads: int, steps: int, kinds) -> list[dict]:
    rng, rows = np.random.default_rng(1), []
    decoders = {f"{b}/{p}": Decoder(folder, provider="cpu", threads=threads, backend=b, precision=p, measuring=True) for b, p in kinds}
    for context in contexts:
        prompt = rng.integers(0, 256, size=context).tolist()
        row = {"context": context}
        for key, decoder in decoders.items():
            _, state = decoder.prefill([prompt], room=steps + 4)
            time.sleep(0.2)  # the last backend's idle threads have stopped spinning
            token = [1]
            for _ in range(2):  # warm-up, from the same state (a branch: the state is a value)
                decoder.step(token, state)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                logits, state = decoder.step(token, state)
                times.append(time.perf_counter() - start)
                token = [int(logits[0].argmax())]
            row[f"{key}_ms"] = float(np.median(times) * 1e3)
            del state
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bf16_quality(folder: Path, model) -> dict:
    text = quality.heldout(256)
    batch = quality.windows(text.ids, model.config.max_seq_len)
    want, reference = quality.eager_logits(model, batch)
    found = {}
    for name, runner in (("model.onnx", quality.model_runner(folder / "model.onnx", "openvino", "bf16")),
                         ("decoder.onnx", quality.decoder_runner(folder, "openvino", "bf16"))):
        report = quality.measure(runner, want, batch, quality.QualityReport(name, reference, QUALITY["bf16"], text.source))
        found[name] = {"top1": report.top1, "kl": report.kl, "ok": report.ok}
    return found


def fastest(row: dict, passes_bf16: bool) -> str:
    keys = [k for k in NAMES if f"{k}_ms" in row and (k != "openvino/bf16" or passes_bf16)]
    return NAMES[min(keys, key=lambda k: row[f"{k}_ms"])]


def markdown(results: dict) -> str:
    lines = [f"# onnxruntime and OpenVINO on the same files: {results['machine']}, {results['threads']} threads, batch 1", "",
             f"OpenVINO {results['openvino']}; bf16 {'available' if results['bf16'] else 'not available on this CPU'}. "
             "Errors: max |x - onnxruntime| / max |onnxruntime| over the logits.", ""]
    for family, r in results["families"].items():
        q = r.get("bf16_quality")
        passes = {name: bool(q and q[name]["ok"]) for name in ("model.onnx", "decoder.onnx")}
        lines += [f"## {family}", ""]
        if q:
            lines += ["bf16 against float32 eager on held-out text (8 x 512 positions): " + "; ".join(
                f"{name} top-1 {v['top1']:.4f}, KL {v['kl']:.2e} ({'passes' if v['ok'] else 'fails'} the bar)" for name, v in q.items()), ""]
        has_bf16 = any("openvino/bf16_ms" in row for row in r["prefill"])
        head = "| tokens | onnxruntime ms | OpenVINO f32 ms (x) | " + ("OpenVINO bf16 ms (x) | " if has_bf16 else "") + \
            "max rel error f32" + (" / bf16" if has_bf16 else "") + " | fastest that passes |"
        lines += ["### prefill (model.onnx)", "", head, "|---:|---:|---:|" + ("---:|" if has_bf16 else "") + "---:|---|"]
        for row in r["prefill"]:
            base = row["onnxruntime/f32_ms"]
            cells = [str(row["length"]), f"{base:.2f}", f"{row['openvino/f32_ms']:.2f} ({base / row['openvino/f32_ms']:.2f}x)"]
            if has_bf16:
                cells.append(f"{row['openvino/bf16_ms']:.2f} ({base / row['openvino/bf16_ms']:.2f}x)")
            cells.append(f"{row['openvino/f32_rel']:.1e}" + (f" / {row['openvino/bf16_rel']:.1e}" if has_bf16 else ""))
            cells.append(fastest(row, passes["model.onnx"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "### decode (decoder.onnx, ms per token after a prompt of the context)", "",
                  "| context | onnxruntime | OpenVINO f32 (x) | " + ("OpenVINO bf16 (x) | " if has_bf16 else "") + "fastest that passes |",
                  "|---:|---:|---:|" + ("---:|" if has_bf16 else "") + "---|"]
        for row in r["decode"]:
            base = row["onnxruntime/f32_ms"]
            cells = [str(row["context"]), f"{base:.2f}", f"{row['openvino/f32_ms']:.2f} ({base / row['openvino/f32_ms']:.2f}x)"]
            if has_bf16:
                cells.append(f"{row['openvino/bf16_ms']:.2f} ({base / row['openvino/bf16_ms']:.2f}x)")
            cells.append(fastest(row, passes["decoder.onnx"]))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1,16,128,1024,4096,16384")
    parser.add_argument("--long", action="store_true", help="add 65,536 tokens")
    parser.add_argument("--contexts", default="128,2048,16384")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--families", default="dsconv,gss,mhesa")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "backends")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")] + ([65536] if args.long else [])
    contexts = [int(c) for c in args.contexts.split(",")]
    torch.set_num_threads(args.threads)
    bf16 = has_bf16()
    kinds = KINDS if bf16 else KINDS[:2]
    results = {"machine": cpu_name(), "threads": args.threads, "openvino": version(), "bf16": bf16, "families": {}}
    for family in args.families.split(","):
        model = model_of(family, max(max(lengths), max(contexts)) + args.steps + 8)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            export_model(model, "onnx", folder, validate=False)
            entry = {"prefill": prefill_rows(folder, lengths, args.threads, args.repeats, kinds),
                     "decode": decode_rows(folder, contexts, args.threads, args.steps, kinds)}
            if bf16:
                entry["bf16_quality"] = bf16_quality(folder, model)
            results["families"][family] = entry
        print(markdown({**results, "families": {family: entry}}), flush=True)
    write_results(args.out, results, markdown(results))


if __name__ == "__main__":
    main()
