"""Shared pieces of the benchmarks: timing, the reference model, the machine's own limits."""
from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from gss_export.model import GatedDsConvLM, GSSConfig

# the issues' reference size
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


def reference_models(max_seq_len: int, seed: int = 0):
    """(ours, upstream): the reference configuration with the same random weights."""
    from gated_state_spaces_pytorch import GatedDsConvLM as Upstream

    torch.manual_seed(seed)
    cfg = GSSConfig(**REFERENCE, max_seq_len=max_seq_len)
    upstream = Upstream(**REFERENCE, max_seq_len=max_seq_len).eval()
    ours = GatedDsConvLM(cfg)
    ours.load_state_dict(upstream.state_dict(), strict=True)
    return ours.eval(), upstream


def matmul_flops_per_token(cfg: GSSConfig) -> int:
    """FLOPs of the model's matrix products per position (2 per multiply-add); the convolution excluded."""
    hidden = cfg.dim_hidden
    per_layer = cfg.dim * hidden + cfg.dim * cfg.dim_dsconv + cfg.dim_dsconv * cfg.heads + cfg.dim_dsconv * hidden + hidden * cfg.dim
    return 2 * (cfg.depth * per_layer + cfg.dim * cfg.num_tokens)


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def machine_limits(threads: int, size: int = 2048) -> dict:
    """The machine's float32 matrix-multiply rate (torch and onnxruntime, size^3) and memory bandwidth.

    Bandwidth: copying a 512 MiB array (twice the 260 MiB L3 of the machine this was written on),
    counting the bytes read and written.
    """
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    flops = 2 * size**3
    torch_rate = flops / timed(lambda: torch.matmul(a, b), min_repeats=5)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "mm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "AB"],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [size, size])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    session = ort.InferenceSession(proto.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    feeds = {"A": a.numpy(), "B": b.numpy()}
    ort_rate = flops / timed(lambda: session.run(None, feeds), min_repeats=5)
    src = np.ones(128 << 20, np.float32)
    dst = np.empty_like(src)
    bandwidth = 2 * src.nbytes / timed(lambda: np.copyto(dst, src), min_repeats=5)
    return {
        "matmul_gflops_torch": torch_rate / 1e9,
        "matmul_gflops_onnxruntime": ort_rate / 1e9,
        # the machine's rate: the better of the two libraries, so fractions are never flattered
        "matmul_gflops": max(torch_rate, ort_rate) / 1e9,
        "bandwidth_gbs": bandwidth / 1e9,
        "threads": threads,
    }
