"""Shared pieces of the benchmarks: timing, the reference model, the machine's own limits."""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from gss_export.families import GatedDsConvLM, DsConvConfig

# the reference size every benchmark uses
REFERENCE = dict(num_tokens=256, dim=512, depth=4, heads=8, dim_dsconv=512)


def timed(fn, min_repeats: int = 3, min_seconds: float = 1.0, max_repeats: int = 50) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < min_seconds and len(times) < max_repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)



def write_results(out: Path, results: dict, markdown: str) -> str:
    """OUT/results.json (the measurements) and OUT/results.md (`markdown`, their table); returns `markdown`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown)
    return markdown

def best_of(fn, repeats: int) -> float:
    """Seconds: the best of `repeats` runs after one warm-up (one long run is seconds; the minimum is the least noisy)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def reference_models(max_seq_len: int, seed: int = 0):
    """(ours, upstream): the reference configuration with the same random weights."""
    from gated_state_spaces_pytorch import GatedDsConvLM as Upstream

    torch.manual_seed(seed)
    cfg = DsConvConfig(**REFERENCE, max_seq_len=max_seq_len)
    upstream = Upstream(**REFERENCE, max_seq_len=max_seq_len).eval()
    ours = GatedDsConvLM(cfg)
    ours.load_state_dict(upstream.state_dict(), strict=True)
    return ours.eval(), upstream


def matmul_flops_per_token(cfg: DsConvConfig) -> int:
    """FLOPs of the model's matrix products per position (2 per multiply-add); the convolution excluded."""
    hidden = cfg.dim_hidden
    per_layer = cfg.dim * hidden + cfg.dim * cfg.dim_dsconv + cfg.dim_dsconv * cfg.heads + cfg.dim_dsconv * hidden + hidden * cfg.dim
    return 2 * (cfg.depth * per_layer + cfg.dim * cfg.num_tokens)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def session_options(threads: int) -> ort.SessionOptions:
    """What gss-run's sessions use: these threads, and the int8 guard (gss_runtime.int8_cpu)."""
    from gss_runtime.int8_cpu import guard

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return guard(options)


class MachineLimits:
    """The machine's float32 matrix-multiply rate and memory bandwidth, sampled again and again.

    One sample is not enough: on a shared machine the same 2048^3 product has measured anywhere from
    210 to 330 GFLOP/s within an hour while the model's own times moved by a few percent, so a
    fraction of "the" rate would swing with the luck of one measurement. `sample()` is called
    between the benchmark's rows and `summary()` reports the median with the spread.

    Rate: a size^3 product in torch and in onnxruntime with B a weight (prepacked, as the model's
    weights are); the better of the two counts, so fractions are never flattered. Bandwidth:
    copying a 512 MiB array (twice the 260 MiB L3 of the machine this was written on), bytes read
    and written.
    """

    def __init__(self, threads: int, size: int = 2048):
        torch.set_num_threads(threads)
        self.threads, self.flops = threads, 2 * size**3
        self.a, self.b = torch.randn(size, size), torch.randn(size, size)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["A", "B"], ["C"])], "mm",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [size, size])],
            [helper.make_tensor_value_info("C", TensorProto.FLOAT, [size, size])],
            initializer=[numpy_helper.from_array(self.b.numpy(), "B")],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        self.session = ort.InferenceSession(proto.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
        self.src = np.ones(128 << 20, np.float32)
        self.dst = np.empty_like(self.src)
        self.samples: list[dict] = []

    def sample(self) -> dict:
        feeds = {"A": self.a.numpy()}
        got = {
            "torch": self.flops / timed(lambda: torch.matmul(self.a, self.b), min_repeats=5, min_seconds=0.5) / 1e9,
            "onnxruntime": self.flops / timed(lambda: self.session.run(None, feeds), min_repeats=5, min_seconds=0.5) / 1e9,
            "bandwidth": 2 * self.src.nbytes / timed(lambda: np.copyto(self.dst, self.src), min_repeats=5, min_seconds=0.3) / 1e9,
        }
        self.samples.append(got)
        return got

    def summary(self) -> dict:
        best = [max(s["torch"], s["onnxruntime"]) for s in self.samples]
        return {
            "matmul_gflops_torch": statistics.median(s["torch"] for s in self.samples),
            "matmul_gflops_onnxruntime": statistics.median(s["onnxruntime"] for s in self.samples),
            "matmul_gflops": statistics.median(best),  # the rate every fraction is taken against
            "matmul_gflops_range": [min(best), max(best)],
            "bandwidth_gbs": statistics.median(s["bandwidth"] for s in self.samples),
            "samples": len(self.samples),
            "threads": self.threads,
        }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


PEAK_SCRIPT = """
import json, sys
import numpy as np

def hwm_kib():
    # VmHWM belongs to the process's own address space; ru_maxrss would carry the parent's peak across exec
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

kind, path, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = np.random.default_rng(0).integers(0, 256, size=(1, n), dtype=np.int64)
if kind == "gss-run":  # generate 4 tokens after a prompt of n with the torch-free runtime
    from gss_runtime.generate import Generator
    base = hwm_kib()
    gen = Generator(path, provider="cpu", threads=threads)
    run = lambda: gen.generate(ids[0].tolist(), 4)
elif kind == "onnx":
    import onnxruntime as ort
    opts = ort.SessionOptions(); opts.intra_op_num_threads = threads; opts.inter_op_num_threads = 1
    base = hwm_kib()
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    run = lambda: s.run(None, {"input_ids": ids})
else:
    import torch
    torch.set_num_threads(threads)
    if kind == "upstream":
        from gated_state_spaces_pytorch import GatedDsConvLM
        cfg = json.loads(path)
        base = hwm_kib()
        m = GatedDsConvLM(**cfg).eval()
    elif kind == "pt2":
        base = hwm_kib()
        m = torch.export.load(path).module()
    elif kind == "aoti":
        from torch._inductor import aoti_load_package
        base = hwm_kib()
        m = aoti_load_package(path)
    else:
        base = hwm_kib()
        m = torch.jit.load(path)
    def run():
        with torch.inference_mode():
            m(torch.from_numpy(ids))
run()
print(json.dumps({"baseline_mib": base / 1024, "peak_mib": hwm_kib() / 1024}))
"""


def peak_memory(kind: str, path: str, n: int, threads: int) -> dict:
    """Peak resident memory of one run of `kind` (onnx, gss-run, upstream, pt2, aoti, torchscript) at length n,
    in a fresh process so that no other artifact's peak can hide in it."""
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, kind, path, str(n), str(threads)], capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    got = json.loads(proc.stdout)
    return {**got, "model_and_activations_mib": got["peak_mib"] - got["baseline_mib"]}
