"""Rewrite a ``quantize_dynamic`` graph so that activations are quantised per token, not per tensor.

``quantize_dynamic`` quantises each MatMul's input with ``DynamicQuantizeLinear``: one uint8 scale and zero
point for the whole tensor, so a row's result depends on every other row of the batch. Here each such
chain::

    x -> DynamicQuantizeLinear -> (q, a_scale, a_zp)
    MatMulInteger(q, W, a_zp, w_zp) -> Cast -> Mul(a_scale * w_scale) -> y     (then Add(y, bias), untouched)

becomes, with ``w_scale`` per output column as ``quantize_dynamic`` writes it, and every reduction along the
last axis with keepdims, so that s and zp are (..., 1)::

    lo, hi = Min(ReduceMin(x), 0), Max(ReduceMax(x), 0)
    s  = Max((hi - lo) / 255, tiny);  zp = Clip(Round(-lo / s), 0, 255)     DynamicQuantizeLinear's formulas
    q  = QuantizeLinear(x, s, zp, axis=0)              on the 2-D view (tokens, features), viewed back
    y  = MatMulIntegerToFloat(q, W, s, w_scale, 0, w_zp) - (s * zp) * (w_scale * colsum(W - w_zp))

A token is one row of the last axis (an image patch, a text position) and belongs to one sample. Every value
computed for it depends on that token alone: the reductions run along the row, the integer matrix product is
exact whatever the batch, and every float op after it is elementwise with the token's own s and zp. So a
batch's rows come out bit for bit as they do alone.

ONNX Runtime's kernels decide the details. Its ``MatMulInteger`` and ``MatMulIntegerToFloat`` take a scalar
activation zero point only: the product runs with zero point 0 and the zero point's share is subtracted in
float after it (elementwise; its rounding error is a few thousandths of the quantisation error's).
``MatMulIntegerToFloat`` takes a per-row activation scale, applied after the product (``ScaleOutput``), only
when that scale is not a scalar or one-element vector; else it folds it into the column scales
(``acc * (s * w)``: other bits than ``(acc * w) * s``). ``s`` keeps the rank of ``x`` (>= 2), so a batch of
one image, whose final projection has one row, takes the same path as a batch of eight. The kernel would add
a bias before that scale, so the bias stays in its own ``Add``; ONNX Runtime's optimiser leaves it there
(tests/test_quantize.py checks the optimised graph).

Cost against ``quantize_dynamic``'s graph, which ONNX Runtime fuses into ``DynamicQuantizeMatMul`` with the
bias folded in: one more pass over each MatMul's input (two reductions, then the quantisation), three passes
over its output (the zero point's share, its subtraction, the bias), and about twenty small ops on shapes
and on the (tokens, 1) parameters. Measured on ViT-B/32's visual tower (``bench/bench_int8_batches.py``,
2 vCPUs): one image 35.3 -> 39.9 ms on one thread, 23.2 -> 31.0 ms on two; a batch of eight in one run
283 ms against 282 ms for eight per-tensor runs on one thread, 171 against 187 ms on two.

Symmetric quantisation about a fixed 128 would need neither the share nor its subtraction (measured: a few
per cent faster, still slower than per tensor), but halves the resolution of one-sided rows (after GELU,
after a LayerNorm's shift): on the demo model its worst text cosine to fp32 fell from 0.9973 (per tensor)
to 0.9954; this asymmetric form gives 0.9980.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

SCHEME = "per-token"  # the manifest's quantization.activation_scale; absent in directories made before
MS_DOMAIN = "com.microsoft"
_TINY = np.float32(1e-30)  # floor of a scale: an all-zero token quantises to 128 instead of dividing by zero


class Names(NamedTuple):
    """What a per-token quantiser makes: the uint8 tensor, its scales and scale * zero point, (..., 1)."""

    quantized: str
    scale: str
    offset: str


class RewriteError(ValueError):
    """The graph does not have the shape ``quantize_dynamic`` gives it; nothing was written."""


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def _only(nodes: list[onnx.NodeProto], op: str, where: str) -> onnx.NodeProto:
    if len(nodes) != 1 or nodes[0].op_type != op:
        found = ", ".join(n.op_type for n in nodes) or "nothing"
        raise RewriteError(f"{where}: expected one {op}, found {found}")
    return nodes[0]


def _quantizer(x: str, features: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], Names]:
    """Nodes that quantise ``x`` (..., features) per token, the constants they need, and the names they make.

    Scales keep the token axes, (..., 1), to broadcast over the output; ``QuantizeLinear`` takes a per-row
    scale and zero point along one axis only, so it runs on a 2-D view (tokens, features), viewed back after.
    """
    p = f"{x}_per_token"
    rows = numpy_helper.from_array(np.array([-1, features], np.int64), f"{p}_rows_shape")
    nodes = [
        # DynamicQuantizeLinear's parameters, per token: the range includes zero; 255 steps across it.
        helper.make_node("ReduceMax", [x, "per_token_axes"], [f"{p}_row_max"], keepdims=1),
        helper.make_node("ReduceMin", [x, "per_token_axes"], [f"{p}_row_min"], keepdims=1),
        helper.make_node("Max", [f"{p}_row_max", "per_token_zero"], [f"{p}_max"]),
        helper.make_node("Min", [f"{p}_row_min", "per_token_zero"], [f"{p}_min"]),
        helper.make_node("Sub", [f"{p}_max", f"{p}_min"], [f"{p}_range"]),
        helper.make_node("Div", [f"{p}_range", "per_token_qmax"], [f"{p}_raw_scale"]),
        helper.make_node("Max", [f"{p}_raw_scale", "per_token_tiny"], [f"{p}_scale"]),
        helper.make_node("Neg", [f"{p}_min"], [f"{p}_neg_min"]),
        helper.make_node("Div", [f"{p}_neg_min", f"{p}_scale"], [f"{p}_raw_zero_point"]),
        helper.make_node("Round", [f"{p}_raw_zero_point"], [f"{p}_rounded_zero_point"]),
        helper.make_node("Clip", [f"{p}_rounded_zero_point", "per_token_zero", "per_token_qmax"],
                         [f"{p}_zero_point"]),
        helper.make_node("Mul", [f"{p}_zero_point", f"{p}_scale"], [f"{p}_offset"]),  # scale * zero point
        helper.make_node("Cast", [f"{p}_zero_point"], [f"{p}_uint8_zero_point"], to=onnx.TensorProto.UINT8),
        helper.make_node("Reshape", [x, rows.name], [f"{p}_rows"]),
        helper.make_node("Reshape", [f"{p}_scale", "per_token_flat"], [f"{p}_row_scale"]),
        helper.make_node("Reshape", [f"{p}_uint8_zero_point", "per_token_flat"], [f"{p}_row_zero_point"]),
        helper.make_node("QuantizeLinear", [f"{p}_rows", f"{p}_row_scale", f"{p}_row_zero_point"],
                         [f"{p}_quantized_rows"], axis=0),
        helper.make_node("Shape", [x], [f"{p}_shape"]),
        helper.make_node("Reshape", [f"{p}_quantized_rows", f"{p}_shape"], [f"{p}_quantized"]),
    ]
    return nodes, [rows], Names(f"{p}_quantized", f"{p}_scale", f"{p}_offset")


def _product(names: Names, weight: onnx.TensorProto, w_scale: onnx.TensorProto, w_zp: onnx.TensorProto,
             y: str, name: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes for ``y`` = x @ dequantised weight, from the quantised x; and the constant they need.

    ``MatMulIntegerToFloat`` with a zero activation zero point gives s * w_scale * sum(q * (W - w_zp)); the
    zero point's share, (s * zp) * (w_scale * column sums of W - w_zp), is subtracted after it.
    """
    columns = (numpy_helper.to_array(weight).astype(np.int64) - numpy_helper.to_array(w_zp).astype(np.int64)).sum(0)
    sums = numpy_helper.from_array((numpy_helper.to_array(w_scale) * columns.astype(np.float32)).astype(np.float32),
                                   f"{y}_per_token_column_sums")
    nodes = [
        helper.make_node("MatMulIntegerToFloat",
                         [names.quantized, weight.name, names.scale, w_scale.name, "per_token_uint8_zero", w_zp.name],
                         [f"{y}_per_token_raw"], domain=MS_DOMAIN, name=f"{name}_per_token"),
        helper.make_node("Mul", [names.offset, sums.name], [f"{y}_per_token_zero_point_share"]),
        helper.make_node("Sub", [f"{y}_per_token_raw", f"{y}_per_token_zero_point_share"], [y]),
    ]
    return nodes, [sums]


def _constants() -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.array([-1], np.int64), "per_token_axes"),
        numpy_helper.from_array(np.array([-1], np.int64), "per_token_flat"),
        numpy_helper.from_array(np.array(0.0, np.float32), "per_token_zero"),
        numpy_helper.from_array(np.array(255.0, np.float32), "per_token_qmax"),
        numpy_helper.from_array(np.array(_TINY, np.float32), "per_token_tiny"),
        numpy_helper.from_array(np.array(0, np.uint8), "per_token_uint8_zero"),
    ]


def rewrite(model: onnx.ModelProto) -> int:
    """Rewrite every ``DynamicQuantizeLinear`` chain of ``model`` in place; returns how many.

    Raises :class:`RewriteError` (the model untouched) when a chain is not the one described above.
    """
    graph = model.graph
    consumers = _consumers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    inits = {init.name: init for init in graph.initializer}
    constants = _constants()
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id of a DynamicQuantizeLinear -> the nodes in its place
    dropped: set[int] = set()  # ids of the MatMulInteger, Cast and Mul nodes it fed
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            continue
        x = node.input[0]
        q_name, scale_name, zp_name = node.output
        matmuls = consumers[q_name]
        if not matmuls or any(m.op_type != "MatMulInteger" or m.input[0] != q_name or m.input[2] != zp_name
                              or m.input[1] not in inits or len(inits[m.input[1]].dims) != 2 for m in matmuls):
            raise RewriteError(f"{x}: quantised for something else than MatMulInteger with a 2-D weight")
        if any(c.op_type != "Mul" for c in consumers[scale_name]) or consumers[zp_name] != matmuls:
            raise RewriteError(f"{x}: its scale or zero point has other uses")
        new, added, names = _quantizer(x, inits[matmuls[0].input[1]].dims[0])
        constants += added
        for matmul in matmuls:
            where = f"MatMulInteger {matmul.name!r}"
            weight, w_zp = matmul.input[1], matmul.input[3]
            cast = _only(consumers[matmul.output[0]], "Cast", where)
            mul = _only(consumers[cast.output[0]], "Mul", where)
            scales_mul = _only([producer[n] for n in mul.input if n in producer and n != cast.output[0]], "Mul",
                               f"{where}: scale")
            w_scale = [n for n in scales_mul.input if n != scale_name]
            if len(w_scale) != 1 or w_scale[0] not in inits or len(inits[w_scale[0]].dims) > 1 or w_zp not in inits:
                raise RewriteError(f"{where}: weight scale and zero point must be initialisers, one per column")
            product, added = _product(names, inits[weight], inits[w_scale[0]], inits[w_zp], mul.output[0],
                                      matmul.name)
            new += product
            constants += added
            dropped.update(id(n) for n in (matmul, cast, mul, scales_mul))
        replaced[id(node)] = new
    if not replaced:
        raise RewriteError("no DynamicQuantizeLinear in this graph")
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:  # the new nodes take the DynamicQuantizeLinear's place: still topologically sorted
        if id(node) in replaced:
            nodes += replaced[id(node)]
        elif id(node) not in dropped:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(replaced)


def rewrite_file(src: Path, dst: Path) -> int:
    """Rewrite the graph at ``src`` into ``dst`` (may be the same path); returns the chains rewritten."""
    model = onnx.load(str(src))
    count = rewrite(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return count
