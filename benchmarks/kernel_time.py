"""Where an ONNX prefill's time goes, and what no convolution form could remove.

- `kernel_breakdown`: onnxruntime's own per-kernel profile, split into the model's weight products
  (MatMul/Gemm with a weight initializer) and everything else;
- `export_without_conv`: the same model with its convolution removed (out = u), the bound on any
  conv form: what is left is the weight products and the model's own LayerNorm, Gelu, gating and
  residual passes.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from common import session_options
from gss_export import DEFAULT_OPSET
from gss_export.families import GatedDsConvLM
from gss_export.artifacts import save_onnx
from gss_export.targets.onnx import trace_onnx

PRODUCTS = ("MatMul", "Gemm", "FusedMatMul")


def weight_product_nodes(path: str) -> set[str]:
    """Names of the product nodes (top level and inside If branches) that multiply by an initializer."""
    model = onnx.load(path, load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    names: set[str] = set()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            if node.op_type in PRODUCTS and any(i in weights for i in node.input[:2]):
                names.add(node.name)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(model.graph)
    return names


def kernel_breakdown(path: str, ids: np.ndarray, threads: int, runs: int = 5) -> dict:
    """Median per-run milliseconds of kernels: `weight products`, `other`, and per op type.

    ids: (batch, n) int64. The If node that wraps a branch is left out (its time is its branch's).
    """
    weights = weight_product_nodes(path)
    options = session_options(threads)
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        start = time.perf_counter()
        session.run(None, {"input_ids": ids})  # the warm-up run, dropped below, also sizes the sample
        runs = min(30, max(runs, int(1.0 / (time.perf_counter() - start))))  # about a second: noise
        for _ in range(runs):
            session.run(None, {"input_ids": ids})
        with open(session.end_profiling()) as f:
            events = json.load(f)
    per_run: list[dict] = []
    current: dict | None = None
    for event in events:  # events are in time order; each model_run closes the kernels before it
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["args"]["op_name"] != "If":
            current = current if current is not None else defaultdict(float)
            name = event["name"][: -len("_kernel_time")]
            key = "weight products" if name in weights else event["args"]["op_name"]
            current[key] += event["dur"] / 1e3
        elif event.get("name") == "model_run" and current is not None:
            per_run.append(current)
            current = None
    per_run = per_run[1:]  # the first run warms up
    keys = {k for run in per_run for k in run}
    ms = {k: statistics.median(run.get(k, 0.0) for run in per_run) for k in keys}
    return {"weight products": ms.pop("weight products", 0.0), "other": sum(ms.values()), "by_op": dict(sorted(ms.items(), key=lambda kv: -kv[1]))}


class NoConv(nn.Module):
    """A convolution that costs nothing: out = u (the model is then wrong, only its cost matters)."""

    def forward(self, u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        return u


def export_without_conv(model: GatedDsConvLM, path: str) -> None:
    """`model` exported like the default ONNX export but with every layer's convolution removed."""
    bare = model.with_conv("direct")
    for layer in bare.layers:
        layer.dsconv.conv = NoConv()
    save_onnx(trace_onnx(bare, opset=DEFAULT_OPSET), Path(path))
