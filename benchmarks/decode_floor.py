"""A decoding step against its memory floor, for every family, context and batch; the first step apart.

    python benchmarks/decode.py --floor [--long] [--contexts 128,4096,16384] [--batches 1,4,16]
                                        [--steps 16] [--threads 2] [--out benchmarks/results/decode]

On a CPU a step must at least read the weights once and read its state (and write it back, for the
recurrent families, whose step replaces the whole state). That traffic over the machine's memory
bandwidth, measured in the same run, is the step's floor; the table gives each step's time against it.

Models: the reference configurations (dim 512, depth 4, num_tokens 256, random weights):
GatedDsConvLM with heads 8 and dim_dsconv 512; GatedStateSpacesLM and GatedExponentialSmoothingLM with
upstream's defaults otherwise (`families.py`). Exported to ONNX, run by the torch-free `Decoder`.

For each family and context C a prompt of C tokens is prefilled once; a batch of b rows is that state
forked b times (`rows`), which is what b prompts of C tokens would hold. Then:
- first step: the first call after the prompt, as the Generator and gss-serve make it (the state's room
  for the tokens to come reserved at once), and as it was before they reserved it (GatedDsConvLM: the
  buffers grow on that step, copying the whole past). Median of 3, each from a fresh copy of the state;
- steady: the median of `--steps` steps after it.
- bytes: weights (decoder.onnx's initializers) + state read (+ state written, recurrent); the floor is
  bytes / bandwidth, bandwidth the better of a numpy copy and an onnxruntime elementwise product over
  512 MiB, on the benchmark's threads (bytes read + written). Weights of 55 MB can sit partly in a large
  L3, so at short contexts a step may come near or under this DRAM floor.

`--long` adds a context of 65,536 tokens (batch 1; GatedDsConvLM exported with max_seq_len 65,536).
Writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from common import REFERENCE, cpu_name, session_options, timed, write_results
from families import CONFIGS, models
from gss_export.export import export_model
from gss_runtime.decoder import Decoder, DecoderState

NAMES = {"dsconv": "GatedDsConvLM", "gss": "GatedStateSpacesLM", "mhesa": "GatedExponentialSmoothingLM"}


def bandwidth(threads: int, mib: int = 512) -> dict:
    """Bytes read + written per second: numpy's copy (one thread) and onnxruntime's Mul (`threads`)."""
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    copy = 2 * src.nbytes / timed(lambda: np.copyto(dst, src), min_repeats=5, min_seconds=0.5)
    graph = helper.make_graph([helper.make_node("Mul", ["X", "s"], ["Y"])], "stream",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [len(src)]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [len(src)])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    session = ort.InferenceSession(proto.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    feeds = {"X": src, "s": np.array(1.0, np.float32)}
    session.run(None, feeds)  # the arena's output buffer, once
    ort_rate = 2 * src.nbytes / timed(lambda: session.run(None, feeds), min_repeats=5, min_seconds=0.5)
    return {"numpy_copy_gbs": copy / 1e9, "onnxruntime_mul_gbs": ort_rate / 1e9, "gbs": max(copy, ort_rate) / 1e9}


def weight_bytes(folder: Path) -> int:
    model = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    return sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer)


def export(family: str, max_seq_len: int, out: Path) -> None:
    if family == "dsconv":
        from common import reference_models

        model = reference_models(max_seq_len)[0]
    else:
        model = models(family, max_seq_len)[0]
    export_model(model, "onnx", out, validate=False)


def step_seconds(decoder: Decoder, state, tokens: np.ndarray) -> float:
    start = time.perf_counter()
    decoder.step(tokens, state)
    return time.perf_counter() - start


def measure(decoder: Decoder, context: int, batches: list[int], steps: int, gbs: float, weights: int) -> list[dict]:
    rng = np.random.default_rng(context)
    _, prompt_state = decoder.prefill([rng.integers(0, 256, size=context).tolist()])
    rows = []
    for b in batches:
        tokens = rng.integers(0, 256, size=b)
        fork = np.zeros(b, np.int64)
        step_seconds(decoder, prompt_state.rows(fork, spare=1), tokens)  # onnxruntime's first call at this shape
        firsts = {"first_ms": [], "first_unreserved_ms": []}
        for _ in range(3):  # taken in turn
            for name, spare in (("first_ms", steps + 1), ("first_unreserved_ms", 0)):
                state = prompt_state.rows(fork, spare=spare)  # fresh buffers, as b prefilled prompts hold them
                firsts[name].append(step_seconds(decoder, state, tokens))
                del state
        firsts = {name: statistics.median(times) * 1e3 for name, times in firsts.items()}
        state = prompt_state.rows(fork, spare=steps + 1)
        _, state = decoder.step(tokens, state)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            _, state = decoder.step(tokens, state)
            times.append(time.perf_counter() - start)
        steady = statistics.median(times)
        recurrent = not isinstance(state, DecoderState)
        state_read = state.nbytes
        state_written = state.nbytes if recurrent else state_read // state.length  # the new slot only
        moved = weights + state_read + state_written
        floor = moved / (gbs * 1e9)
        rows.append({"context": context, "batch": b, "steady_ms": steady * 1e3, **firsts, "first_over_steady": firsts["first_ms"] / (steady * 1e3),
                     "weight_bytes": weights, "state_read_bytes": state_read, "state_written_bytes": state_written,
                     "floor_ms": floor * 1e3, "over_floor": steady / floor})
        del state
    return rows


def markdown(results: dict) -> str:
    bw = results["bandwidth"]
    lines = [f"# Decode against its memory floor ({results['cpu']}, {results['threads']} threads)", "",
             f"Bandwidth, read + written: numpy copy {bw['numpy_copy_gbs']:.1f} GB/s, onnxruntime Mul "
             f"{bw['onnxruntime_mul_gbs']:.1f} GB/s; the floor uses {bw['gbs']:.1f} GB/s. Reference models, random weights; "
             f"steady: median of {results['steps']} steps; first: the first step after the prompt, median of 3.", ""]
    for family, rows in results["families"].items():
        lines += [f"## {NAMES[family]}", "",
                  "| context | batch | steady ms | first step ms (room reserved) | first step ms (before: no reserve) | MB a step moves (weights + state) | floor ms | steady / floor |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            mb = (r["weight_bytes"] + r["state_read_bytes"] + r["state_written_bytes"]) / 1e6
            lines.append(f"| {r['context']:,} | {r['batch']} | {r['steady_ms']:.2f} | {r['first_ms']:.2f} | {r['first_unreserved_ms']:.2f} "
                         f"| {mb:,.1f} ({r['weight_bytes'] / 1e6:.1f} + {(r['state_read_bytes'] + r['state_written_bytes']) / 1e6:,.1f}) "
                         f"| {r['floor_ms']:.2f} | {r['over_floor']:.2f}x |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="128,4096,16384")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--families", default="dsconv,gss,mhesa")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--long", action="store_true", help="also a context of 65,536 tokens, batch 1")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode")
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    results = {"cpu": cpu_name(), "threads": args.threads, "steps": args.steps, "bandwidth": bandwidth(args.threads),
               "config": {"dsconv": REFERENCE, **CONFIGS}, "families": {}}
    print(f"bandwidth {results['bandwidth']['gbs']:.1f} GB/s", flush=True)
    for family in args.families.split(","):
        longest = 65536 if args.long else max(contexts)
        with tempfile.TemporaryDirectory() as tmp:
            export(family, longest + args.steps + 8, Path(tmp))
            decoder = Decoder(tmp, provider="cpu", threads=args.threads)
            weights = weight_bytes(Path(tmp))
            rows = []
            for context in contexts + ([65536] if args.long else []):
                rows += measure(decoder, context, batches if context <= 16384 else [1], args.steps, results["bandwidth"]["gbs"], weights)
                print(json.dumps(rows[-1]), flush=True)
            results["families"][family] = rows
    print(write_results(args.out, results, markdown(results)))


if __name__ == "__main__":
    main()
