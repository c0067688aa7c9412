"""The recurrent families: decode cost per token against the context, and the prompt against upstream eager.

    python benchmarks/families.py [--contexts 128,2048,16384] [--lengths 1,16,128,512,1024,2048,4096]
                                  [--tokens 32] [--threads 2] [--out benchmarks/results/families]

Models: GatedStateSpacesLM and GatedExponentialSmoothingLM with dim 512, depth 4, num_tokens 256 and
upstream's defaults otherwise (GSS: dss_kernel_H 256, dss_kernel_N 512, dim_expansion_factor 4;
MHESA: heads 8, dim_mhesa 512), random weights, batch 1, exported to ONNX (default settings). In one
process, on the same threads, per family:

- decode: gss-run's Generator prefills a prompt of C tokens, then its time per greedy token is
  measured over `--tokens` steps, with the state's bytes (fixed: it is the same at every C);
- prompt: the time to take a prompt of n tokens and return its state and last logits (gss-run's path:
  prefill.onnx above 128 tokens, decoder.onnx up to it), the default model.onnx forward, and
  upstream eager's forward, each the median of repeats, taken in turn.

Writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import cpu_name, session_options, timed, write_results
from gss_export.export import export_model
from gss_export.families import FAMILIES
from gss_runtime.decoder import Decoder
from gss_runtime.generate import Generator

CONFIGS = {
    "gss": dict(num_tokens=256, dim=512, depth=4),
    "mhesa": dict(num_tokens=256, dim=512, depth=4),
}


def models(family: str, max_seq_len: int, seed: int = 0):
    """(ours, upstream) with the same random weights."""
    entry = FAMILIES[family]
    torch.manual_seed(seed)
    config = entry.config(**CONFIGS[family], max_seq_len=max_seq_len)
    upstream = entry.upstream(config).eval()
    ours = entry.model(config)
    ours.load_state_dict(upstream.state_dict(), strict=True)
    return ours.eval(), upstream, config


def decode_rows(folder: Path, contexts: list[int], tokens: int, threads: int) -> list[dict]:
    gen = Generator(folder, provider="cpu", threads=threads)
    rng = np.random.default_rng(0)
    rows = []
    for context in contexts:
        prompt = rng.integers(0, 256, size=context).tolist()
        gen.generate(prompt, 2)  # warm-up
        result = gen.generate(prompt, tokens)
        rows.append({"context": context, "ms_per_token": result.decode_seconds / result.steps * 1e3,
                     "state_bytes": result.state_bytes, "prefill_ms": result.prefill_seconds * 1e3})
    return rows


def prompt_rows(folder: Path, upstream, lengths: list[int], threads: int) -> list[dict]:
    import onnxruntime as ort

    decoder = Decoder(folder, provider="cpu", threads=threads)
    forward = ort.InferenceSession(str(folder / "model.onnx"), session_options(threads), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    rows = []
    for n in lengths:
        ids = rng.integers(0, 256, size=(1, n))
        prompt = ids[0].tolist()
        t_prompt = timed(lambda: decoder.prefill([prompt]), min_seconds=0.5)
        t_forward = timed(lambda: forward.run(["logits"], {"input_ids": ids}), min_seconds=0.5)
        with torch.inference_mode():
            t_eager = timed(lambda: upstream(torch.from_numpy(ids)), min_seconds=0.5)
        rows.append({"length": n, "prompt_ms": t_prompt * 1e3, "forward_ms": t_forward * 1e3, "upstream_ms": t_eager * 1e3,
                     "upstream_over_prompt": t_eager / t_prompt})
    return rows


def markdown(results: dict) -> str:
    lines = [f"# Recurrent families: {results['machine']}, {results['threads']} threads, batch 1", ""]
    for family, r in results["families"].items():
        c = r["config"]
        lines += [f"## {r['upstream_class']} ({', '.join(f'{k} {v}' for k, v in c.items() if k not in ('family', 'max_seq_len'))})", "",
                  "| context | ms per token | state bytes | vs context 128 |", "|---:|---:|---:|---:|"]
        base = r["decode"][0]["ms_per_token"]
        lines += [f"| {d['context']} | {d['ms_per_token']:.2f} | {d['state_bytes']:,} | {d['ms_per_token'] / base:.2f}x |" for d in r["decode"]]
        lines += ["", "| prompt tokens | gss-run prompt (ms) | model.onnx forward (ms) | upstream eager (ms) | upstream / prompt |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {p['length']} | {p['prompt_ms']:.2f} | {p['forward_ms']:.2f} | {p['upstream_ms']:.2f} | {p['upstream_over_prompt']:.2f}x |"
                  for p in r["prompt"]]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="128,2048,16384")
    parser.add_argument("--lengths", default="1,16,128,512,1024,2048,4096")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--families", default="gss,mhesa")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "families")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    torch.set_num_threads(args.threads)
    results = {"machine": cpu_name(), "threads": args.threads, "tokens": args.tokens, "families": {}}
    for family in args.families.split(","):
        ours, upstream, config = models(family, max(max(contexts), max(lengths)) + args.tokens + 1)
        with tempfile.TemporaryDirectory() as tmp:
            export_model(ours, "onnx", tmp, validate=False)
            results["families"][family] = {
                "upstream_class": FAMILIES[family].upstream_class, "config": config.to_dict(),
                "decode": decode_rows(Path(tmp), contexts, args.tokens, args.threads),
                "prompt": prompt_rows(Path(tmp), upstream, lengths, args.threads),
            }
        print(markdown({**results, "families": {family: results["families"][family]}}), flush=True)
    write_results(args.out, results, markdown(results))


if __name__ == "__main__":
    main()
