"""One ONNX model that picks its convolution form by sequence length, inside the graph.

The Toeplitz form (`direct`) wins at short lengths (few nodes, one small product per head) and
the monarch form at long ones (O(n^(4/3)) instead of O(n^2)). `switch_by_length` joins two exports
of the same weights under an ONNX `If` on the sequence length: each branch is one export's whole
graph, the weights they share live once in the outer graph (branches read outer-scope values), so
the file is barely larger than one export. torch.cond could not export this with symbolic sizes,
hence the join after export.
"""
from __future__ import annotations

import hashlib

import onnx
from onnx import TensorProto, helper, numpy_helper


def _content(t: onnx.TensorProto) -> tuple:
    """What makes two initializers interchangeable: type, shape and bytes (names differ between exports:
    the exporter numbers the transposed weights it creates)."""
    return t.data_type, tuple(t.dims), hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest()


def _renamed(proto, name: str):
    """A copy of a node, tensor or value info under another name."""
    copy = type(proto)()
    copy.CopyFrom(proto)
    copy.name = name
    return copy


def _branch(model: onnx.ModelProto, prefix: str, outer: dict[str, str]) -> onnx.GraphProto:
    """`model`'s graph as an If branch: no inputs, initializers in `outer` (local -> outer name) read
    from the outer graph, every other name it defines prefixed."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise ValueError("exports with nested subgraphs are not supported")
    defined = {o for n in g.node for o in n.output if o} | {i.name for i in g.initializer}
    rename = {name: outer.get(name, prefix + name) for name in defined}
    nodes = []
    for node in g.node:
        copy = _renamed(node, prefix + node.name)
        copy.input[:] = [rename.get(x, x) for x in node.input]
        copy.output[:] = [rename.get(x, x) for x in node.output]
        nodes.append(copy)
    inits = [_renamed(init, rename[init.name]) for init in g.initializer if init.name not in outer]
    outputs = [_renamed(out, rename.get(out.name, out.name)) for out in g.output]
    return helper.make_graph(nodes, prefix + "graph", [], outputs, initializer=inits)


def switch_by_length(short: onnx.ModelProto, long: onnx.ModelProto, threshold: int) -> onnx.ModelProto:
    """A model that runs `short` for sequence length <= threshold and `long` above it.

    Both must be exports of the same weights with the same inputs and outputs (input_ids
    (batch, sequence) -> logits); initializers equal in name and value are stored once.
    """
    if [i.name for i in short.graph.input] != [i.name for i in long.graph.input] or \
            [o.name for o in short.graph.output] != [o.name for o in long.graph.output]:
        raise ValueError("the two exports must have the same inputs and outputs")
    if short.functions or long.functions:
        raise ValueError("exports with local functions are not supported")
    long_by_content = {_content(i): i.name for i in long.graph.initializer}
    shared, short_outer, long_outer = [], {}, {}
    for init in short.graph.initializer:
        twin = long_by_content.get(_content(init))
        if twin is not None and twin not in long_outer:
            name = f"shared/{init.name}"
            short_outer[init.name], long_outer[twin] = name, name
            shared.append(_renamed(init, name))
    (ids,) = [i.name for i in short.graph.input]
    switch = [
        helper.make_node("Shape", [ids], ["length_switch/shape"]),
        helper.make_node("Gather", ["length_switch/shape", "length_switch/axis"], ["length_switch/n"], axis=0),
        helper.make_node("LessOrEqual", ["length_switch/n", "length_switch/threshold"], ["length_switch/short"]),
        helper.make_node(
            "If", ["length_switch/short"], [o.name for o in short.graph.output],
            then_branch=_branch(short, "short/", short_outer), else_branch=_branch(long, "long/", long_outer),
        ),
    ]
    constants = [
        helper.make_tensor("length_switch/axis", TensorProto.INT64, [], [1]),
        helper.make_tensor("length_switch/threshold", TensorProto.INT64, [], [threshold]),
    ]
    graph = helper.make_graph(
        switch, long.graph.name, list(short.graph.input), list(short.graph.output), initializer=shared + constants,
    )
    model = helper.make_model(graph, opset_imports=list(long.opset_import), producer_name=long.producer_name,
                              producer_version=long.producer_version)
    model.ir_version = max(short.ir_version, long.ir_version)
    return model
