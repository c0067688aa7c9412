"""What a matrix-product convolution cannot go below: its transform's products, run alone.

The default ONNX form (`monarch`, `gss_export/conv/onnx_monarch.py`) evaluates a layer's convolution as a
forward transform of u (three matrix products), a complex product with the kernel's spectrum, and the
inverse transform (three more). `floor_model` is that chain for one layer at one length with the rest
taken away:

- the kernel's own transform is gone, and its spectrum is taken as one, so the complex product
  becomes a Concat of the spectrum's two halves: the least a pass that reads both can cost;
- the stage matrices are stored, not computed from the length in-graph.

The form does everything its floor does (the same products on tensors of the same shapes, the same
padding and slicing) and more, so the floor's time bounds the form's cost at that length from below.
With the form's own matrices and a spectrum of one the chain is the identity, which
`tests/test_conv_floor.py` checks: it runs the real products, not stand-ins of the same shapes.

Other factorizations of the same transform (order 3 to 5: N = N1 * b^(order - 1), any block b) get
matrices of their shapes filled at random: a product's time does not depend on its values, so
`best_floor` bounds every block choice and order the form could be given, not only the current one.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from common import best_of, session_options

from gss_export.conv.monarch import monarch_matrices, monarch_sizes

# the factorizations `best_floor` tries: (order, b)
CANDIDATES = [(3, 8), (3, 16), (3, 32), (3, 64), (4, 8), (4, 16), (5, 8)]


def outer_size(n: int, order: int, b: int) -> int:
    """N1 for a transform of N = N1 * b^(order - 1) >= 2n positions (N1 even, as the form needs)."""
    inner = b ** (order - 1)
    return 2 * ((n + inner - 1) // inner)


def stage_shapes(n1: int, b: int, order: int) -> list[tuple[int, ...]]:
    """The chain's matrices in the order they run: stage 1, the middle stages, the last stage's real
    and imaginary rows, the last stage's inverse, the middle inverses, stage 1's inverse."""
    g = n1 // 2 + 1
    middle = [(g * b ** (j - 2), 2 * b, 2 * b) for j in range(2, order)]
    last = g * b ** (order - 2)
    return [(2 * g, n1 // 2), *middle, (last, b, 2 * b), (last, b, 2 * b), (last, 2 * b, 2 * b), *middle[::-1], (n1 // 2, 2 * g)]


def form_matrices(n: int) -> tuple[int, int, list[np.ndarray]]:
    """(N1, b, matrices) of the default form at length n, in `stage_shapes` order (order 3)."""
    n1, b = monarch_sizes(n)
    m1, g2, g3, m1_inverse = (t.numpy().astype(np.float32) for t in monarch_matrices(n1, b, torch.device("cpu"), torch.float64))
    transpose = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1))  # noqa: E731
    return n1, b, [m1, g2, np.ascontiguousarray(g3[:, :b]), np.ascontiguousarray(g3[:, b:]), transpose(g3), transpose(g2), m1_inverse]


def random_matrices(n1: int, b: int, order: int) -> list[np.ndarray]:
    """Matrices of another factorization's shapes, for timing only."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal(shape, dtype=np.float32) for shape in stage_shapes(n1, b, order)]


def floor_model(n: int, channels: int, n1: int, b: int, order: int, matrices: list[np.ndarray]) -> onnx.ModelProto:
    """The transform chain for x: (1, n, channels) -> (1, n, channels); see the module docstring."""
    inner = b ** (order - 1)
    g, half = n1 // 2 + 1, n1 * inner // 2
    first, *middle, last_re, last_im, last_inverse = matrices[: order + 2]
    middle_inverse, first_inverse = matrices[order + 2 : -1], matrices[-1]
    initializers = [numpy_helper.from_array(np.zeros((1, half - n, channels), np.float32), "padding")]
    nodes: list[onnx.NodeProto] = []
    count = itertools.count()

    def add(op: str, *inputs, **attrs) -> str:
        out = f"t{next(count)}"
        nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def const(value) -> str:
        name = f"c{len(initializers)}"
        initializers.append(numpy_helper.from_array(np.asarray(value, np.float32 if isinstance(value, np.ndarray) else np.int64), name))
        return name

    def product(matrix: np.ndarray, x: str, shape: list[int]) -> str:
        return add("MatMul", const(matrix), add("Reshape", x, const(shape)))

    # stage j (2 .. order) contracts digit j for each of the g * b^(j - 2) groups of the digits before it
    view = lambda j: [1, g * b ** (j - 2), 2 * b, b ** (order - j) * channels]  # noqa: E731
    x = add("Concat", "x", "padding", axis=1)
    x = product(first, x, [1, n1 // 2, inner * channels])
    for j, matrix in enumerate(middle, start=2):
        x = product(matrix, x, view(j))
    x = add("Concat", product(last_re, x, view(order)), product(last_im, x, view(order)), axis=2)  # the kernel's spectrum as one
    x = add("MatMul", const(last_inverse), x)
    for j, matrix in zip(range(order - 1, 1, -1), middle_inverse):
        x = product(matrix, x, view(j))
    x = add("Reshape", product(first_inverse, x, [1, 2 * g, inner * channels]), const([1, half, channels]))
    add("Slice", x, const([0]), const([n]), const([1]))
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "transform_floor", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n, channels])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n, channels])], initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def floor_ms(model: onnx.ModelProto, channels: int, n: int, threads: int, repeats: int = 3) -> float:
    """Best-of-`repeats` milliseconds of a floor model after a warm-up run."""
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(n).standard_normal((1, n, channels), dtype=np.float32)
    return best_of(lambda: session.run(None, {"x": x}), repeats) * 1e3


def form_floor_ms(n: int, channels: int, threads: int, repeats: int = 3) -> float:
    """The default form's floor for one layer at length n."""
    n1, b, matrices = form_matrices(n)
    return floor_ms(floor_model(n, channels, n1, b, 3, matrices), channels, n, threads, repeats)


def best_floor(n: int, channels: int, threads: int, repeats: int = 3) -> tuple[float, str]:
    """(ms, "order o, b = ...") of the cheapest factorization in CANDIDATES for one layer at length n.

    Factorizations whose N1 passes 512 (stage 1's inner size is N1/2; at N1 = 512 it was already the
    slowest of these at 16,384 tokens) or that pad past 4n positions are skipped."""
    best = (float("inf"), "")
    for order, b in CANDIDATES:
        n1 = outer_size(n, order, b)
        if n1 > 512 or n1 * b ** (order - 1) > 4 * max(n, 2):
            continue
        ms = floor_ms(floor_model(n, channels, n1, b, order, random_matrices(n1, b, order)), channels, n, threads, repeats)
        best = min(best, (ms, f"order {order}, b = {b}, N1 = {n1}"))
    return best
