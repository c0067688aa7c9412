"""gss-serve's scoring costs: a prompt scored with echo against one forward pass, and n samples from one prefill.

    python benchmarks/serve_scoring.py [--family dsconv|gss] [--threads 2] [--repeats 5] [--out benchmarks/results/scoring]

The reference model (dim 512, depth 4; random weights) exported to ONNX and served by a live
`gss-serve --threads N` on loopback. Measured side by side in one run, alternating, the best of
`--repeats` each:

- `echo: true, max_tokens: 0, logprobs: 1` on a 2,000-token prompt (the whole request: HTTP, the
  prefill graph's logits at every position, the log-softmax and the JSON answer) against one
  `model.onnx` forward of the same 2,000 tokens in this process with the same threads. Goal: at most 1.3x.
- `n: 8` against `n: 1` on a 1,000-token prompt, `max_tokens: 16`, temperature 1. The prompt is
  prefilled once and its state copied into 8 rows. Goal: at most 1.3x. Every one of the 8 choices is
  checked equal to its solo run with its derived seed (seed + j). Beside it, what bounds the ratio: the
  decoder's steps at 1 and at 8 rows after the 1,000-token prompt, each from the prompt's state copied
  into its rows (that copy also timed alone), in this process with the server's threads; the bound is
  (n1 - the copy and 15 steps of 1 row + the copy and 15 steps of 8 rows) / n1.

Writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from common import REFERENCE, cpu_name, session_options
from gss_runtime import Decoder
from gss_runtime.session import SPIN_IN_CALL
from serve import export, start_server

HERE = Path(__file__).resolve().parent
GOAL = 1.3


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns: dict, repeats: int) -> dict:
    """name -> best seconds of `repeats` runs, the candidates taking turns (after one warm-up each)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="dsconv", choices=("dsconv", "gss", "mhesa"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "results" / "scoring")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    scored = rng.integers(32, 127, 2000).tolist()
    shared = rng.integers(32, 127, 1000).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(args.family, Path(tmp) / "model", max_seq_len=2048)
        forward = ort.InferenceSession(str(folder / "model.onnx"), session_options(args.threads), providers=["CPUExecutionProvider"])
        proc, url = start_server(folder, args.threads, 32)
        http = httpx.Client(base_url=url, timeout=600)

        def post(**body) -> dict:
            reply = http.post("/v1/completions", json=body)
            reply.raise_for_status()
            return reply.json()

        try:
            echo = alternate({
                "forward": lambda: forward.run(None, {"input_ids": np.array([scored], np.int64)}),
                "echo": lambda: post(prompt=scored, max_tokens=0, echo=True, logprobs=1),
            }, args.repeats)
            sample = dict(prompt=shared, max_tokens=16, temperature=1.0, seed=7)
            fork = alternate({"n1": lambda: post(**sample), "n8": lambda: post(**sample, n=8)}, args.repeats)
            many = post(**sample, n=8)["choices"]
            equal = sum(c["token_ids"] == post(**{**sample, "seed": 7 + c["index"]})["choices"][0]["token_ids"] for c in many)
            answer = post(prompt=scored, max_tokens=0, echo=True, logprobs=1)
        finally:
            proc.terminate()
            proc.wait(30)
        decoder = Decoder(folder, provider="cpu", threads=args.threads, spin=SPIN_IN_CALL)  # as the server opens it
        _, state = decoder.prefill([shared])
        forked = lambda k: state.repack(np.zeros(k, np.int64), spare=16)  # noqa: E731  (the prompt's state in k rows)

        def steps(k):  # from a fresh fork each time: stepping one state twice would branch off a copy of it
            s = forked(k)
            for _ in range(15):
                _, s = decoder.step(np.full(k, 65, np.int64), s)

        parts = alternate({"step1": lambda: steps(1), "step8": lambda: steps(8), "copy8": lambda: forked(8)}, args.repeats)
    report = {"cpu": cpu_name(), "threads": args.threads, "family": args.family,
              "model": REFERENCE if args.family == "dsconv" else {"num_tokens": 256, "dim": 512, "depth": 4},
              "echo_2000": {"forward_ms": echo["forward"] * 1e3, "echo_ms": echo["echo"] * 1e3,
                            "ratio": echo["echo"] / echo["forward"], "entries": len(answer["choices"][0]["logprobs"]["tokens"])},
              "n8_1000": {"n1_ms": fork["n1"] * 1e3, "n8_ms": fork["n8"] * 1e3, "ratio": fork["n8"] / fork["n1"],
                          "choices_equal_to_solo": equal, "choices": len(many),
                          "steps15_1row_ms": parts["step1"] * 1e3, "steps15_8rows_ms": parts["step8"] * 1e3,
                          "copy_8rows_ms": parts["copy8"] * 1e3,
                          "bound": (fork["n1"] - parts["step1"] + parts["step8"]) / fork["n1"]}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"results_{args.family}.json").write_text(json.dumps(report, indent=1))
    e, n = report["echo_2000"], report["n8_1000"]
    lines = [f"# gss-serve scoring ({args.family}; {cpu_name()}, {args.threads} threads)", "",
             "| measure | baseline | gss-serve | ratio | goal |", "|---|---|---|---|---|",
             f"| echo + max_tokens 0, 2,000-token prompt, vs one model.onnx forward | {e['forward_ms']:.1f} ms | {e['echo_ms']:.1f} ms | "
             f"{e['ratio']:.2f}x | <= {GOAL}x |",
             f"| n 8 vs n 1, 1,000-token prompt, max_tokens 16 | {n['n1_ms']:.1f} ms | {n['n8_ms']:.1f} ms | {n['ratio']:.2f}x | "
             f"<= {GOAL}x ({n['choices_equal_to_solo']}/{n['choices']} choices equal to their solo runs) |",
             f"| what bounds it: the prompt's state copied into 1 / 8 rows and 15 decoder steps, after 1,000 tokens (the 8-row copy alone) | "
             f"{n['steps15_1row_ms']:.1f} ms | {n['steps15_8rows_ms']:.1f} / copy {n['copy_8rows_ms']:.1f} ms | "
             f"{n['bound']:.2f}x bound | |"]
    (args.out / f"results_{args.family}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
