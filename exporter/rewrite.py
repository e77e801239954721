"""Graph passes that make an exported BERT padding-free with EET plugin nodes.

Each pass is a small function over an ``onnx_graphsurgeon.Graph``. Attention is found by structure, from
its anchor (a ``Softmax`` or an ONNX ``Attention`` node), never by tensor names:

- eager:  ``MatMul(Q, K^T) [* / scale] [+ mask] -> Softmax -> MatMul(., V)``
- SDPA decomposition: the same with ``sqrt(scale)`` on Q and on K, K^T by Reshape/Transpose, and the
  ``IsNaN``/``Where`` guard after Softmax
- ONNX ``Attention`` (opset 23+): ``Attention(Q, K, V [, mask])``

Q, K and V are traced back through head-splitting layout ops (Reshape, Transpose, Squeeze, Unsqueeze,
Identity; scalar Mul/Div folded into the scale) to the projections ``[B, S, hidden]``; the output is traced
forward through the head-merging Transpose/Reshape to ``[B, S, hidden]``. The whole subgraph becomes one
``EetVarlenAttention`` node reading the projections (fused, below) and ``cu_seqlens``; the mask computation dies.

The plugin reads q, k and v from one fused tensor ``[..., 3 * hidden]`` (:func:`qkv_input`): BERT's three
``Linear`` projections of one activation become one (:func:`fuse_projections`: concatenated weights and
biases, so one GEMM with its bias add instead of three of each); GPT-2's ``c_attn`` output, which the export
cuts into thirds, is taken uncut (:func:`fused_qkv`); anything else is concatenated.

GPT-2 (:func:`rewrite_gpt2`) gets one ``EetPrePadAttention`` node per layer instead, with the same fused input.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from eet.errors import EetError
from eet.plugins.spec import PREPAD_ATTENTION, VARLEN_ATTENTION

LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")
CU_SEQLENS = "cu_seqlens"
MAX_SEQLEN = "max_seqlen"
PACKED_INPUTS = ("input_ids", "token_type_ids", "position_ids")
MASK_INPUT = "attention_mask"
PAD_LENGTHS = "pad_lengths"
STEP = "step"
NEXT_TOKEN_OUTPUT = "next_token"
LOGITS_OUTPUT = "logits"
HIDDEN_OUTPUT = "hidden_states"
FIRST_TOKEN_OUTPUT = "first_token_states"


class NoMatch(Exception):
    """An attention anchor whose surroundings are not a form the rewriter knows (internal; see EetError)."""


@dataclass
class AttentionMatch:
    """One attention subgraph.

    Attributes:
        anchor: the Softmax or Attention node.
        query, key, value: the projection tensors [B, S, hidden] the heads are split from.
        context: the tensor [B, S, hidden] the heads are merged into.
        scale: the softmax scale the subgraph applies to q.k.
    """

    anchor: object
    query: object
    key: object
    value: object
    context: object
    scale: float


# ----------------------------------------------------------------------------------------------- helpers
def _producer(tensor):
    return tensor.inputs[0] if len(tensor.inputs) else None


def _constant_values(tensor) -> np.ndarray | None:
    """The values of a constant tensor (initializer or Constant node), else None."""
    import onnx_graphsurgeon as gs

    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = _producer(tensor)
    if node is not None and node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
        return np.asarray(node.attrs["value"].values)
    return None


def _scalar(tensor) -> float | None:
    """The value of a one-element constant (initializer or Constant node), else None."""
    values = _constant_values(tensor)
    if values is None or values.size != 1:
        return None
    return float(values.reshape(-1)[0])


def _scaling(node):
    """``(data, factor)`` when ``node`` multiplies or divides ``data`` by a scalar constant (a Mul's constant may
    stand on either side, a Div's only on the right); else None."""
    if node is None or node.op not in ("Mul", "Div") or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    for data, other in [(a, b), (b, a)] if node.op == "Mul" else [(a, b)]:
        value = _scalar(other)
        if value is not None and value != 0.0:
            return data, (value if node.op == "Mul" else 1.0 / value)
    return None


def _trace_back(tensor, what: str):
    """Walk from an attention operand back through layout ops and scalar scales to the projection.

    Returns (projection tensor, accumulated scale); raises NoMatch when no Reshape split the heads."""
    scale, reshapes = 1.0, 0
    while True:
        node = _producer(tensor)
        if node is None:
            break
        if node.op in LAYOUT_OPS:
            reshapes += node.op in ("Reshape", "Squeeze", "Unsqueeze")
            tensor = node.inputs[0]
            continue
        scaled = _scaling(node)
        if scaled is None:
            break
        tensor, factor = scaled
        scale *= factor
    if reshapes == 0:
        raise NoMatch(f"the {what} operand is not split into heads by a Reshape (reached "
                      f"{_describe(_producer(tensor))})")
    return tensor, scale


def _trace_forward(tensor):
    """Walk from the per-head attention output through the head-merging Transpose/Reshape."""
    reshapes = 0
    while len(tensor.outputs) == 1 and tensor.outputs[0].op in ("Transpose", "Reshape"):
        node = tensor.outputs[0]
        reshapes += node.op == "Reshape"
        tensor = node.outputs[0]
    if reshapes == 0:
        raise NoMatch("the attention output is not merged back from heads by a Reshape")
    return tensor


def _describe(node) -> str:
    return "a graph input" if node is None else f"{node.op} node {node.name!r}"


def module_scopes(model) -> dict[str, str]:
    """Node name -> the module path ``torch.onnx`` recorded for it (metadata ``namespace``), if any."""
    scopes = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == "namespace":
                scopes[node.name] = prop.value
    return scopes


def layer_label(node, index: int, scopes: dict[str, str] | None = None) -> str:
    """A human name for the attention at position ``index``: the layer the exporter recorded
    (e.g. ``layer 3 (m.encoder.layer.3.attention)``) when it did, plus the node name."""
    # BERT: encoder.layer.3.attention; GPT-2: transformer.h.3.attn
    found = re.findall(r"([\w.]*?\b(?:layer|layers|h|block)\.(\d+)\.(?:attention|attn))\b",
                       (scopes or {}).get(node.name, ""))
    where = f"layer {found[0][1]} ({found[0][0]})" if found else f"attention #{index}"
    return f"{where}, node {node.name!r}"


# ----------------------------------------------------------------------------------------------- matching
def _scores_matmul(tensor):
    """From the Softmax input back to MatMul(Q, K^T): skip scalar scales and additive masks."""
    scale = 1.0
    while True:
        node = _producer(tensor)
        if node is None:
            raise NoMatch("the Softmax input does not come from a MatMul")
        if node.op == "MatMul":
            return node, scale
        scaled = _scaling(node)
        if scaled is not None:
            tensor, factor = scaled
            scale *= factor
            continue
        if node.op == "Add":
            # the additive mask: keep walking along the operand that leads to the scores MatMul
            for operand in node.inputs:
                try:
                    found, inner = _scores_matmul(operand)
                except NoMatch:
                    continue
                return found, scale * inner
            raise NoMatch("neither operand of the Add before Softmax comes from MatMul(Q, K^T)")
        if node.op == "Where":
            # a masked fill, Where(mask, scores, fill) (GPT-2's eager attention before transformers 5 applies
            # its causal mask so): the kernels apply their own masks, so walk along the scores operand
            found = []
            for operand in node.inputs[1:]:
                try:
                    found.append(_scores_matmul(operand))
                except NoMatch:
                    continue
            if len(found) != 1:
                raise NoMatch(f"{len(found)} operands of the Where before Softmax come from MatMul(Q, K^T), "
                              "expected one (a masked fill)")
            return found[0][0], scale * found[0][1]
        raise NoMatch(f"unexpected {_describe(node)} between MatMul(Q, K^T) and Softmax")


def _probs_consumer(softmax):
    """The MatMul(P, V) that consumes the softmax output (through the IsNaN/Where guard of SDPA)."""
    tensor = softmax.outputs[0]
    for _ in range(4):
        users = [n for n in tensor.outputs if n.op != "IsNaN"]
        if len(users) != 1:
            raise NoMatch(f"the attention probabilities have {len(users)} consumers (expected one MatMul)")
        node = users[0]
        if node.op == "MatMul" and node.inputs[0] is tensor:
            return node
        if node.op in ("Where", "Cast", "Identity", "Dropout"):
            tensor = node.outputs[0]
            continue
        raise NoMatch(f"the attention probabilities go to {_describe(node)}, not MatMul(P, V)")
    raise NoMatch("no MatMul(P, V) after Softmax")


def match_softmax_attention(softmax) -> AttentionMatch:
    """Match ``MatMul(Q, K^T) [scale] [+ mask] -> Softmax -> MatMul(., V)`` around ``softmax``."""
    axis = softmax.attrs.get("axis", -1)
    if axis not in (-1, 3):
        raise NoMatch(f"Softmax over axis {axis}, expected the last axis")
    qk, scale = _scores_matmul(softmax.inputs[0])
    query, q_scale = _trace_back(qk.inputs[0], "query")
    key, k_scale = _trace_back(qk.inputs[1], "key")
    pv = _probs_consumer(softmax)
    value, v_scale = _trace_back(pv.inputs[1], "value")
    if v_scale != 1.0:
        raise NoMatch("the value operand is scaled")
    context = _trace_forward(pv.outputs[0])
    return AttentionMatch(softmax, query, key, value, context, scale * q_scale * k_scale)


def match_onnx_attention(node, head_dim: int) -> AttentionMatch:
    """Match an ONNX ``Attention`` node (opset 23+) without KV cache, causal mask or softcap."""
    present = [t for t in node.inputs[4:] if t is not None and getattr(t, "name", "")]
    if present:
        raise NoMatch("the Attention node has past key/value inputs (a KV cache), which BERT never has")
    if node.attrs.get("is_causal", 0):
        raise NoMatch("the Attention node is causal; BERT attention is bidirectional")
    if node.attrs.get("softcap", 0.0):
        raise NoMatch("the Attention node uses softcap, which the EET kernel does not implement")
    if node.attrs.get("qk_matmul_output_mode", 0):
        raise NoMatch("the Attention node exports its QK matrix, which the EET kernel does not produce")
    used = [o for o in node.outputs[1:] if o.outputs]
    if used:
        raise NoMatch("the Attention node's extra outputs are used")
    query, q_scale = _trace_back(node.inputs[0], "query")
    key, k_scale = _trace_back(node.inputs[1], "key")
    value, v_scale = _trace_back(node.inputs[2], "value")
    if v_scale != 1.0:
        raise NoMatch("the value operand is scaled")
    scale = node.attrs.get("scale")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    context = _trace_forward(node.outputs[0])
    return AttentionMatch(node, query, key, value, context, scale * q_scale * k_scale)


def find_attention(graph, head_dim: int, scopes: dict[str, str] | None = None) -> list[AttentionMatch]:
    """Match every attention of ``graph`` (topologically sorted), or raise :class:`EetError` naming the
    first one that is not in a known form."""
    graph.toposort()
    anchors = [n for n in graph.nodes if n.op in ("Softmax", "Attention")]
    matches = []
    for index, node in enumerate(anchors):
        try:
            match = (match_softmax_attention(node) if node.op == "Softmax"
                     else match_onnx_attention(node, head_dim))
        except NoMatch as exc:
            raise EetError(f"cannot rewrite the attention of {layer_label(node, index, scopes)}: {exc}. The rewriter "
                           "knows the eager MatMul/Softmax chain, the SDPA decomposition and the ONNX "
                           "Attention op; try another export form (--export-form)") from exc
        matches.append(match)
    return matches


# ----------------------------------------------------------------------------------------------- passes
def add_packing_inputs(graph):
    """Add the graph inputs ``cu_seqlens`` (int32 [B+1]) and ``max_seqlen`` (int32 [S], a shape carrier)."""
    import onnx_graphsurgeon as gs

    cu = gs.Variable(CU_SEQLENS, dtype=np.int32, shape=["batch_plus_1"])
    carrier = gs.Variable(MAX_SEQLEN, dtype=np.int32, shape=["max_seqlen"])
    graph.inputs.extend([cu, carrier])
    return cu, carrier


def _rewire(graph, match: AttentionMatch, out, hidden: int, index: int):
    """Point the consumers of the old attention output at ``out`` (the plugin's [.., S, hidden] output),
    reshaped to [-1, hidden] where the exporter had merged heads into a 2-D tensor (GPT-2's Gemm)."""
    import onnx_graphsurgeon as gs

    rank = len(match.context.shape) if match.context.shape is not None else None
    if rank == 2:
        flat = gs.Variable(f"eet_attention_{index}_2d", dtype=out.dtype)
        graph.nodes.append(gs.Node("Reshape", name=f"eet_attention_{index}_to_2d", inputs=[
            out, gs.Constant(f"eet_attention_{index}_2d_shape", np.array([-1, hidden], dtype=np.int64))],
            outputs=[flat]))
        out = flat
    elif rank not in (None, 3):
        raise EetError(f"attention output of rank {rank} after merging heads; expected 2 or 3")
    for consumer in list(match.context.outputs):
        for i, tensor in enumerate(consumer.inputs):
            if tensor is match.context:
                consumer.inputs[i] = out
    graph.outputs = [out if t is match.context else t for t in graph.outputs]


def replace_attention(graph, match: AttentionMatch, index: int, cu_seqlens, max_seqlen, num_heads: int,
                      head_dim: int):
    """Replace one matched attention by an ``EetVarlenAttention`` node reading q, k and v from one fused tensor
    (:func:`qkv_input`); the old subgraph is left dead for ``graph.cleanup()``."""
    import onnx_graphsurgeon as gs

    out = gs.Variable(f"eet_attention_{index}", dtype=match.context.dtype)
    qkv = qkv_input(graph, match, index, num_heads * head_dim)
    node = VARLEN_ATTENTION.make_node(
        gs, [qkv, cu_seqlens, max_seqlen], [out],
        dict(num_heads=num_heads, head_dim=head_dim, scale=match.scale), name=f"EetVarlenAttention_{index}")
    graph.nodes.append(node)
    _rewire(graph, match, out, num_heads * head_dim, index)
    return node


def _const_ints(tensor) -> list[int] | None:
    """The values of a constant int tensor (initializer or Constant node) as a list, else None."""
    values = _constant_values(tensor)
    if values is None or not np.issubdtype(values.dtype, np.integer):
        return None
    return [int(v) for v in values.reshape(-1)]


def _rank(tensor) -> int | None:
    return len(tensor.shape) if tensor.shape is not None else None


def _last_dim(tensor) -> int | None:
    """The last axis' size of ``tensor`` when its annotated shape gives it as a number, else None."""
    if not tensor.shape:
        return None
    dim = tensor.shape[-1]
    return int(dim) if isinstance(dim, (int, np.integer)) and dim >= 0 else None


def _is_last_axis(axis: int, rank: int | None) -> bool:
    return axis == -1 or (rank is not None and axis == rank - 1)


def _split_thirds(node, hidden: int) -> bool:
    """Whether ``node`` is a ``Split`` of its input over the last axis into three outputs of ``hidden`` each.

    The sizes come from the ``split`` input (opset 13+) or attribute (opset < 13) when given, else the split is
    even (``num_outputs`` = 3 in opset 18+, or the output count before): then the input's last axis must be
    known to be 3 * hidden, or each output's to be hidden (an uneven opset-18 split would make the last one
    shorter)."""
    data = node.inputs[0]
    rank = _rank(data)
    if rank is None:
        rank = next((_rank(o) for o in node.outputs if _rank(o) is not None), None)
    if len(node.outputs) != 3 or not _is_last_axis(int(node.attrs.get("axis", 0)), rank):
        return False
    if len(node.inputs) > 1 and node.inputs[1] is not None and getattr(node.inputs[1], "name", ""):
        sizes = _const_ints(node.inputs[1])
        if sizes is None:  # sizes computed at run time: nothing to prove the thirds with
            return False
    elif "split" in node.attrs:
        sizes = [int(v) for v in node.attrs["split"]]
    else:
        sizes = None
    if sizes is not None:
        return sizes == [hidden] * 3  # sizes must add up to the axis: it is 3 * hidden
    return _last_dim(data) == 3 * hidden or all(_last_dim(o) == hidden for o in node.outputs)


def _slice_third(node, hidden: int) -> tuple[object, int] | None:
    """``(data, i)`` when ``node`` is a ``Slice`` taking columns [i * hidden, (i + 1) * hidden) of the last
    axis of ``data`` with step 1, ``i`` in 0, 1, 2 (opset 10+ inputs, or the attributes of opset < 10); else
    None. Omitted axes default to 0, 1, ... as in ONNX."""
    def given(i):
        return len(node.inputs) > i and node.inputs[i] is not None and getattr(node.inputs[i], "name", "")

    data = node.inputs[0]
    if given(1):
        starts, ends = _const_ints(node.inputs[1]), _const_ints(node.inputs[2]) if given(2) else None
        axes = _const_ints(node.inputs[3]) if given(3) else [0]
        steps = _const_ints(node.inputs[4]) if given(4) else [1]
    else:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes", [0]), [1]
    if starts is None or ends is None or axes is None or steps is None:
        return None
    if not (len(starts) == len(ends) == len(axes) == len(steps) == 1) or list(steps) != [1]:
        return None
    rank = _rank(data) if _rank(data) is not None else _rank(node.outputs[0])
    if not _is_last_axis(int(axes[0]), rank):
        return None
    start, end = int(starts[0]), int(ends[0])
    for i in range(3):
        # the last third may run to the end of the axis, written as a huge end
        if start == i * hidden and (end == (i + 1) * hidden or (i == 2 and end >= 3 * hidden)):
            return data, i
    return None


def fused_qkv(match: AttentionMatch, hidden: int):
    """The fused projection ``[B, S, 3 * hidden]`` that ``match``'s query, key and value are the three thirds
    of (in that order, along the last axis), found by structure: one ``Split`` with outputs (q, k, v), or three
    ``Slice`` nodes of one tensor. Its last axis must be known to be exactly 3 * hidden. None otherwise."""
    producers = [_producer(t) for t in (match.query, match.key, match.value)]
    if any(p is None for p in producers):
        return None
    split = producers[0]
    if split.op == "Split" and all(p is split for p in producers):
        in_order = [o is t for o, t in zip(split.outputs, (match.query, match.key, match.value))]
        if len(split.outputs) == 3 and all(in_order) and _split_thirds(split, hidden):
            return split.inputs[0]
        return None
    if all(p.op == "Slice" for p in producers) and len({id(p) for p in producers}) == 3:
        thirds = [_slice_third(p, hidden) for p in producers]
        if any(t is None for t in thirds):
            return None
        data = thirds[0][0]
        if all(t[0] is data for t in thirds) and [t[1] for t in thirds] == [0, 1, 2] and \
                _last_dim(data) == 3 * hidden:
            return data
    return None


def _projection(tensor):
    """``(x, weight [k, n], bias [n])`` when ``tensor`` is ``MatMul(x, W)`` with a constant 2-D ``W``, plus a constant
    bias of n values (the ``Add``'s operands either way round; no ``Add``: a bias of zeros); else None."""
    node, bias = _producer(tensor), None
    if node is not None and node.op == "Add" and len(node.inputs) == 2:
        for product, other in (node.inputs, node.inputs[::-1]):
            matmul, values = _producer(product), _constant_values(other)
            if matmul is not None and matmul.op == "MatMul" and values is not None:
                node, bias = matmul, values
                break
        else:
            return None
    if node is None or node.op != "MatMul" or len(node.inputs) != 2:
        return None
    weight = _constant_values(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return None
    if bias is None:
        bias = np.zeros(weight.shape[1], weight.dtype)
    if bias.size != weight.shape[1] or bias.dtype != weight.dtype:
        return None
    return node.inputs[0], weight, bias.reshape(-1)


def fuse_projections(graph, match: AttentionMatch, index: int, hidden: int):
    """One projection for ``match``'s query, key and value when they are three of the same activation, found by
    structure (:func:`_projection`: ``x @ Wq + bq``, ``x @ Wk + bk``, ``x @ Wv + bv``, constant weights
    [k, hidden] and biases): ``x @ [Wq | Wk | Wv] + [bq | bk | bv]``, the fused ``[..., 3 * hidden]`` tensor the
    attention plugin reads in place. The three projections die with the old attention (unless something else
    reads them). Returns the fused tensor, or None where the projections are not of that form."""
    import onnx_graphsurgeon as gs

    parts = [_projection(t) for t in (match.query, match.key, match.value)]
    if any(p is None for p in parts) or any(p[0] is not parts[0][0] for p in parts):
        return None
    x, weights, biases = parts[0][0], [p[1] for p in parts], [p[2] for p in parts]
    if any(w.shape != (weights[0].shape[0], hidden) or w.dtype != weights[0].dtype for w in weights):
        return None
    weight = gs.Constant(f"eet_attention_{index}_qkv_weight", np.ascontiguousarray(np.concatenate(weights, axis=1)))
    bias = gs.Constant(f"eet_attention_{index}_qkv_bias", np.ascontiguousarray(np.concatenate(biases)))
    product = gs.Variable(f"eet_attention_{index}_qkv_product", dtype=match.query.dtype)
    qkv = gs.Variable(f"eet_attention_{index}_qkv", dtype=match.query.dtype)
    graph.nodes.append(gs.Node("MatMul", name=f"eet_attention_{index}_qkv_projection", inputs=[x, weight],
                               outputs=[product]))
    graph.nodes.append(gs.Node("Add", name=f"eet_attention_{index}_qkv_bias_add", inputs=[product, bias],
                               outputs=[qkv]))
    return qkv


def qkv_input(graph, match: AttentionMatch, index: int, hidden: int):
    """The ``qkv`` input of layer ``index``'s attention plugin, in the first form that applies:

    1. the fused projection the query, key and value were cut from (:func:`fused_qkv`, GPT-2's ``c_attn``; the
       cut then dies and the kernel reads the thirds in place);
    2. one projection made of the three (:func:`fuse_projections`, BERT's query, key and value ``Linear`` layers:
       one GEMM with its bias instead of three GEMMs and three bias adds);
    3. a ``Concat`` of the three on the last axis (correct, but one copy)."""
    import onnx_graphsurgeon as gs

    fused = fused_qkv(match, hidden)
    if fused is None:
        fused = fuse_projections(graph, match, index, hidden)
    if fused is not None:
        return fused
    qkv = gs.Variable(f"eet_attention_{index}_qkv", dtype=match.query.dtype)
    graph.nodes.append(gs.Node("Concat", name=f"eet_attention_{index}_concat_qkv",
                               inputs=[match.query, match.key, match.value], outputs=[qkv], attrs={"axis": -1}))
    return qkv


def replace_prepad_attention(graph, match: AttentionMatch, index: int, pad_lengths, step, num_heads: int,
                             head_dim: int):
    """Replace one matched (causal) attention by an ``EetPrePadAttention`` node with this layer's KV cache:
    graph inputs ``past_key.<index>`` / ``past_value.<index>`` [B, heads, L, head_dim], updated in place (the
    node's outputs ``present_key.<index>`` / ``present_value.<index>`` alias them). The node reads q, k, v from
    one fused tensor (:func:`qkv_input`)."""
    import onnx_graphsurgeon as gs

    dtype = match.context.dtype or np.float32
    caches = [gs.Variable(f"past_{kind}.{index}", dtype=dtype, shape=["batch", num_heads, "max_len", head_dim])
              for kind in ("key", "value")]
    graph.inputs.extend(caches)
    out = gs.Variable(f"eet_attention_{index}", dtype=dtype)
    presents = [gs.Variable(f"present_{kind}.{index}", dtype=dtype) for kind in ("key", "value")]
    qkv = qkv_input(graph, match, index, num_heads * head_dim)
    node = PREPAD_ATTENTION.make_node(
        gs, [qkv, pad_lengths, step, *caches], [out, *presents],
        dict(num_heads=num_heads, head_dim=head_dim, scale=match.scale), name=f"EetPrePadAttention_{index}")
    graph.nodes.append(node)
    _rewire(graph, match, out, num_heads * head_dim, index)
    return node


def pack_token_inputs(graph):
    """Turn the token inputs [B, S] (int64) into packed int32 [T] inputs feeding the old graph as [1, T]."""
    import onnx_graphsurgeon as gs

    by_name = {t.name: t for t in graph.inputs}
    missing = [n for n in PACKED_INPUTS if n not in by_name]
    if missing:
        raise EetError(f"the exported BERT lacks the inputs {missing}; expected {PACKED_INPUTS}")
    for name in PACKED_INPUTS:
        old = by_name[name]
        old.name = f"{name}_batched"
        packed = gs.Variable(name, dtype=np.int32, shape=["total_tokens"])
        cast = gs.Variable(f"{name}_cast", dtype=old.dtype)
        axes = gs.Constant(f"{name}_unsqueeze_axes", np.array([0], dtype=np.int64))
        graph.nodes.append(gs.Node("Cast", name=f"{name}_to_{np.dtype(old.dtype).name}", inputs=[packed],
                                   outputs=[cast], attrs={"to": _onnx_type(old.dtype)}))
        graph.nodes.append(gs.Node("Unsqueeze", name=f"{name}_as_batch_of_one", inputs=[cast, axes],
                                   outputs=[old]))
        graph.inputs[graph.inputs.index(old)] = packed
    mask = by_name.get(MASK_INPUT)
    if mask is not None:
        graph.inputs.remove(mask)


def packed_outputs(graph, cu_seqlens):
    """Replace the output [1, T, H] by ``hidden_states`` [T, H] and ``first_token_states`` [B, H]."""
    import onnx_graphsurgeon as gs

    if len(graph.outputs) != 1:
        raise EetError(f"expected one output (last_hidden_state), the export has {len(graph.outputs)}")
    last = graph.outputs[0]
    hidden = gs.Variable(HIDDEN_OUTPUT, dtype=last.dtype, shape=["total_tokens", last.shape[-1]
                                                                  if last.shape else "hidden"])
    first = gs.Variable(FIRST_TOKEN_OUTPUT, dtype=last.dtype, shape=["batch", hidden.shape[1]])
    starts = gs.Variable("sequence_starts", dtype=np.int32)
    graph.nodes.extend([
        gs.Node("Squeeze", name="drop_batch_of_one",
                inputs=[last, gs.Constant("squeeze_axes", np.array([0], dtype=np.int64))], outputs=[hidden]),
        gs.Node("Slice", name="sequence_starts",
                inputs=[cu_seqlens, gs.Constant("starts_begin", np.array([0], dtype=np.int64)),
                        gs.Constant("starts_end", np.array([-1], dtype=np.int64))], outputs=[starts]),
        gs.Node("Gather", name="first_tokens", inputs=[hidden, starts], outputs=[first], attrs={"axis": 0}),
    ])
    graph.outputs = [hidden, first]


def _onnx_type(dtype) -> int:
    import onnx

    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def to_fp16(graph):
    """Make the graph compute in fp16, except LayerNormalization, which keeps fp32 statistics
    (fp16 LayerNorm overflows in BERT): its input is cast to fp32 and its output back to fp16.

    Float32 initializers become fp16 copies (a constant shared with a LayerNorm scale/bias keeps its fp32
    original there), Cast-to-float32 becomes Cast-to-float16, float inputs/outputs become fp16."""
    import onnx
    import onnx_graphsurgeon as gs

    halves = {}

    def half(const):
        if const.name not in halves:
            halves[const.name] = gs.Constant(f"{const.name}_fp16", np.asarray(const.values).astype(np.float16))
        return halves[const.name]

    for node in list(graph.nodes):
        keep_fp32 = {1, 2} if node.op == "LayerNormalization" else set()
        for i, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and tensor.values.dtype == np.float32 and i not in keep_fp32:
                node.inputs[i] = half(tensor)
        if node.op == "Cast" and node.attrs.get("to") == onnx.TensorProto.FLOAT:
            node.attrs["to"] = onnx.TensorProto.FLOAT16
        if node.op in ("Constant", "ConstantOfShape"):
            value = node.attrs.get("value")
            if isinstance(value, gs.Constant) and value.values.dtype == np.float32:
                node.attrs["value"] = gs.Constant(value.name, value.values.astype(np.float16))
        if node.op == "LayerNormalization":
            x, y = node.inputs[0], node.outputs[0]
            x32 = gs.Variable(f"{node.name}_input_fp32", dtype=np.float32)
            y32 = gs.Variable(f"{node.name}_output_fp32", dtype=np.float32)
            graph.nodes.append(gs.Node("Cast", name=f"{node.name}_to_fp32", inputs=[x], outputs=[x32],
                                       attrs={"to": onnx.TensorProto.FLOAT}))
            graph.nodes.append(gs.Node("Cast", name=f"{node.name}_to_fp16", inputs=[y32], outputs=[y],
                                       attrs={"to": onnx.TensorProto.FLOAT16}))
            node.inputs[0], node.outputs[0] = x32, y32
            node.attrs["stash_type"] = 1
    for tensor in list(graph.inputs) + list(graph.outputs):
        if tensor.dtype == np.float32:
            tensor.dtype = np.float16


def forget_intermediate_shapes(graph):
    """Drop the exporter's shape/type annotations of inner tensors: batch [B, S] became [1, T]."""
    import onnx_graphsurgeon as gs

    io = {id(t) for t in list(graph.inputs) + list(graph.outputs)}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and id(tensor) not in io:
            tensor.shape = None
            tensor.dtype = None


def prepad_token_inputs(graph, pad_lengths, step):
    """GPT-2 inputs for pre-padding: ``input_ids`` int32 [B, S]; ``position_ids`` computed in the graph as
    Hugging Face does for left padding, ``max(step + i - pad_lengths[b], 0)``; the attention mask removed."""
    import onnx_graphsurgeon as gs

    by_name = {t.name: t for t in graph.inputs}
    missing = [n for n in ("input_ids", "position_ids") if n not in by_name]
    if missing:
        raise EetError(f"the exported GPT-2 lacks the inputs {missing}")
    old_ids, old_pos = by_name["input_ids"], by_name["position_ids"]
    old_ids.name, old_pos.name = "input_ids_int64", "position_ids_int64"
    ids = gs.Variable("input_ids", dtype=np.int32, shape=["batch", "seq"])

    def const(name, value):
        return gs.Constant(name, np.array(value, dtype=np.int64))

    def var(name):
        return gs.Variable(name)

    shape, seq, step_i64, offsets, rng, pads, pads_col, diff = (
        var(n) for n in ("ids_shape", "seq_len", "step_i64", "offsets", "positions_row", "pads_i64",
                         "pads_column", "positions_raw"))
    graph.nodes.extend([
        gs.Node("Cast", name="input_ids_to_int64", inputs=[ids], outputs=[old_ids], attrs={"to": 7}),
        gs.Node("Shape", name="ids_shape", inputs=[ids], outputs=[shape]),
        gs.Node("Gather", name="seq_len", inputs=[shape, const("axis_one", 1)], outputs=[seq], attrs={"axis": 0}),
        # Range(0, S) + step, not Range(step, step + S): the shape must not depend on step's value
        gs.Node("Range", name="offsets", inputs=[const("range_start", 0), seq, const("range_delta", 1)],
                outputs=[offsets]),
        gs.Node("Cast", name="step_to_int64", inputs=[step], outputs=[step_i64], attrs={"to": 7}),
        gs.Node("Add", name="positions_row", inputs=[offsets, step_i64], outputs=[rng]),
        gs.Node("Cast", name="pads_to_int64", inputs=[pad_lengths], outputs=[pads], attrs={"to": 7}),
        gs.Node("Unsqueeze", name="pads_column", inputs=[pads, const("unsqueeze_pads", [1])], outputs=[pads_col]),
        gs.Node("Sub", name="positions_raw", inputs=[rng, pads_col], outputs=[diff]),
        gs.Node("Max", name="positions", inputs=[diff, const("zero_position", 0)], outputs=[old_pos]),
    ])
    graph.inputs = [ids] + [t for t in graph.inputs if t.name not in (old_ids.name, old_pos.name, MASK_INPUT)]


def last_position_head(graph):
    """Run the LM head on each row's last position only, and choose the next token (greedy) in the graph:
    outputs ``next_token`` int32 [B] and ``logits`` [B, V] (of the last position)."""
    import onnx
    import onnx_graphsurgeon as gs

    if len(graph.outputs) != 1 or not graph.outputs[0].inputs or graph.outputs[0].inputs[0].op != "MatMul":
        raise EetError("expected the export's only output to be the LM head MatMul's logits")
    logits = graph.outputs[0]
    head = logits.inputs[0]
    hidden = head.inputs[0]
    if hidden.shape is not None and len(hidden.shape) != 3:
        raise EetError(f"the LM head reads a rank-{len(hidden.shape)} tensor, expected [B, S, H]")
    shape, seq, last, last_hidden = (gs.Variable(n) for n in ("hidden_shape", "hidden_seq", "last_position",
                                                                "last_hidden"))
    token64 = gs.Variable("next_token_int64")
    next_token = gs.Variable(NEXT_TOKEN_OUTPUT, dtype=np.int32, shape=["batch"])
    graph.nodes.extend([
        gs.Node("Shape", name="hidden_shape", inputs=[hidden], outputs=[shape]),
        gs.Node("Gather", name="hidden_seq", inputs=[shape, gs.Constant("seq_axis", np.array(1, np.int64))],
                outputs=[seq], attrs={"axis": 0}),
        gs.Node("Sub", name="last_position", inputs=[seq, gs.Constant("one", np.array(1, np.int64))],
                outputs=[last]),
        gs.Node("Gather", name="last_hidden", inputs=[hidden, last], outputs=[last_hidden], attrs={"axis": 1}),
    ])
    head.inputs[0] = last_hidden
    logits.name, logits.shape = LOGITS_OUTPUT, ["batch", logits.shape[-1] if logits.shape else "vocab"]
    graph.nodes.extend([
        gs.Node("ArgMax", name="greedy", inputs=[logits], outputs=[token64], attrs={"axis": -1, "keepdims": 0}),
        gs.Node("Cast", name="next_token", inputs=[token64], outputs=[next_token],
                attrs={"to": onnx.TensorProto.INT32}),
    ])
    graph.outputs = [next_token, logits]


SAMPLING_INPUTS = ("temperature", "top_k", "top_p", "uniform")


def sampling_head(graph, candidates: int):
    """Sampling in the engine (after :func:`last_position_head`): ``next_token`` becomes a token drawn among the
    ``candidates`` most likely ones, per row, from inputs ``temperature`` float32 [B] (<= 0: greedy), ``top_k``
    int32 [B] (0: all candidates), ``top_p`` float32 [B] in (0, 1] (1: off) and ``uniform`` float32 [B] (one
    draw in [0, 1) per row and step, from the caller's seeded generator). Math in float32.

    Token j of the candidates (sorted by logit) is chosen when cdf[j-1] <= uniform < cdf[j], cdf being the
    cumulative softmax(logit / temperature) over the candidates kept by top-k, then top-p (the smallest prefix
    whose mass reaches top_p), renormalized."""
    import onnx
    import onnx_graphsurgeon as gs

    by_name = {t.name: t for t in graph.outputs}
    greedy_token, logits = by_name[NEXT_TOKEN_OUTPUT], by_name[LOGITS_OUTPUT]
    greedy_token.name = "greedy_token"
    inputs = [gs.Variable("temperature", np.float32, ["batch"]), gs.Variable("top_k", np.int32, ["batch"]),
              gs.Variable("top_p", np.float32, ["batch"]), gs.Variable("uniform", np.float32, ["batch"])]
    temperature, top_k, top_p, uniform = inputs
    graph.inputs.extend(inputs)
    nodes = []

    def op(kind, *args, n_out=1, **attrs):
        outs = [gs.Variable(f"sample_{kind.lower()}_{len(nodes)}_{i}") for i in range(n_out)]
        nodes.append(gs.Node(kind, name=f"sample_{kind.lower()}_{len(nodes)}", inputs=list(args), outputs=outs,
                             attrs=attrs))
        return outs if n_out > 1 else outs[0]

    def const(name, value, dtype):
        return gs.Constant(f"sample_{name}", np.array(value, dtype=dtype))

    column = const("column_axis", [1], np.int64)
    vals, idx = op("TopK", op("Cast", logits, to=onnx.TensorProto.FLOAT), const("k", [candidates], np.int64),
                   n_out=2, axis=-1, largest=1, sorted=1)
    scaled = op("Div", vals, op("Unsqueeze", op("Max", temperature, const("min_t", 1e-6, np.float32)), column))
    k_eff = op("Where", op("Greater", top_k, const("zero_k", 0, np.int32)),
               op("Min", top_k, const("cap_k", candidates, np.int32)), const("all_k", candidates, np.int32))
    keep_k = op("Less", const("ranks", np.arange(candidates)[None, :], np.int32), op("Unsqueeze", k_eff, column))
    probs = op("Softmax", op("Where", keep_k, scaled, const("minus_inf", -np.inf, np.float32)), axis=-1)
    cum = op("CumSum", probs, const("cumsum_axis", 1, np.int64))
    keep_p = op("Less", op("Sub", cum, probs), op("Unsqueeze", top_p, column))
    kept = op("Where", keep_p, probs, const("zero_p", 0.0, np.float32))
    cdf = op("Div", op("CumSum", kept, const("cumsum_axis_2", 1, np.int64)),
             op("ReduceSum", kept, column, keepdims=1))
    below = op("Cast", op("Less", cdf, op("Unsqueeze", uniform, column)), to=onnx.TensorProto.INT64)
    choice = op("Min", op("ReduceSum", below, column, keepdims=1), const("last", candidates - 1, np.int64))
    sampled = op("Cast", op("Squeeze", op("GatherElements", idx, choice, axis=1), column),
                 to=onnx.TensorProto.INT32)
    next_token = gs.Variable(NEXT_TOKEN_OUTPUT, dtype=np.int32, shape=["batch"])
    nodes.append(gs.Node("Where", name="sample_or_greedy", outputs=[next_token], inputs=[
        op("Greater", temperature, const("zero_t", 0.0, np.float32)), sampled, greedy_token]))
    graph.nodes.extend(nodes)
    graph.outputs = [next_token, logits]


# ----------------------------------------------------------------------------------------------- the whole rewrite
def _import_layers(model, num_layers: int, head_dim: int, dtype: str):
    """The graph of ``model`` and the attention of each of its ``num_layers`` layers (or an EetError)."""
    import onnx_graphsurgeon as gs

    if dtype not in ("fp32", "fp16"):
        raise EetError(f"unsupported dtype {dtype!r}: use fp32 or fp16")
    graph = gs.import_onnx(model)
    matches = find_attention(graph, head_dim, module_scopes(model))
    if len(matches) != num_layers:
        raise EetError(f"found {len(matches)} attention subgraphs in the export, but the model has {num_layers} "
                       "layers; the rewriter refuses to leave attention unrewritten")
    return graph, matches


def _finish(graph, model, dtype: str, spec, mask_hint: str, after_dtype=None):
    """Drop the dead attention, prove none is left and the mask is unused, convert to ``dtype``, run
    ``after_dtype(graph)`` (passes that stay float32), export."""
    import onnx
    import onnx_graphsurgeon as gs

    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    leftover = [n for n in graph.nodes if n.op in ("Softmax", "Attention")]
    if leftover:
        raise EetError(f"attention left after the rewrite: {[n.name for n in leftover]}")
    mask_users = [n.name for n in graph.nodes if any(t.name == MASK_INPUT for t in n.inputs)]
    if mask_users:
        raise EetError(f"the attention mask is still used after the rewrite (by {mask_users}): {mask_hint}")
    if dtype == "fp16":
        to_fp16(graph)
    if after_dtype is not None:
        after_dtype(graph)
    forget_intermediate_shapes(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph)
    out.opset_import.append(onnx.helper.make_opsetid(spec.namespace, 1))
    out.ir_version = model.ir_version
    return out


def rewrite_bert(model, *, num_layers: int, num_heads: int, head_dim: int, dtype: str = "fp32"):
    """The padding-free EET graph of an exported BERT.

    Args:
        model: the exported ``onnx.ModelProto`` (inputs ``input_ids``, ``attention_mask``, ``token_type_ids``,
            ``position_ids`` [B, S]; output [B, S, H]).
        num_layers, num_heads, head_dim: from the model config; every layer must be found and rewritten.
        dtype: ``"fp32"`` or ``"fp16"`` (fp32 LayerNorm statistics, fp32 softmax inside the plugin).

    Returns:
        ``onnx.ModelProto`` with inputs ``input_ids``, ``token_type_ids``, ``position_ids`` (int32 [T]),
        ``cu_seqlens`` (int32 [B+1]), ``max_seqlen`` (int32 [S], shape carrier) and outputs
        ``hidden_states`` [T, H], ``first_token_states`` [B, H]; one ``EetVarlenAttention`` node per layer.

    Raises:
        EetError: an attention that does not match (naming the layer), a layer count that differs, a mask
            still used elsewhere.
    """
    graph, matches = _import_layers(model, num_layers, head_dim, dtype)
    cu, carrier = add_packing_inputs(graph)
    for index, match in enumerate(matches):
        replace_attention(graph, match, index, cu, carrier, num_heads, head_dim)
    pack_token_inputs(graph)
    packed_outputs(graph, cu)
    return _finish(graph, model, dtype, VARLEN_ATTENTION, "the model uses it for more than attention, which a "
                   "padding-free graph cannot express")


def rewrite_gpt2(model, *, num_layers: int, num_heads: int, head_dim: int, dtype: str = "fp32",
                 sampling_candidates: int = 0):
    """The pre-padding generation graph of an exported GPT-2 (no KV cache in the export).

    Returns:
        ``onnx.ModelProto`` with inputs ``input_ids`` int32 [B, S] (left-padded), ``pad_lengths`` int32 [B],
        ``step`` int32 [1] (cache position of the first of the S tokens), ``past_key.<l>`` / ``past_value.<l>``
        [B, heads, L, head_dim] per layer (updated in place by the layer's ``EetPrePadAttention``, whose
        outputs ``present_key.<l>`` / ``present_value.<l>`` alias them); outputs ``next_token`` int32 [B]
        (greedy) and ``logits`` [B, V] of each row's last position. With ``sampling_candidates`` > 0, also the
        inputs of :func:`sampling_head`, and ``next_token`` is sampled where ``temperature`` > 0.

    Raises:
        EetError: as :func:`rewrite_bert`.
    """
    import onnx_graphsurgeon as gs

    graph, matches = _import_layers(model, num_layers, head_dim, dtype)
    pads = gs.Variable(PAD_LENGTHS, dtype=np.int32, shape=["batch"])
    step = gs.Variable(STEP, dtype=np.int32, shape=[1])
    graph.inputs.extend([pads, step])
    for index, match in enumerate(matches):
        replace_prepad_attention(graph, match, index, pads, step, num_heads, head_dim)
    prepad_token_inputs(graph, pads, step)
    last_position_head(graph)
    if sampling_candidates < 0:
        raise EetError(f"sampling candidates must be >= 0, got {sampling_candidates}")
    tail = (lambda g: sampling_head(g, sampling_candidates)) if sampling_candidates else None
    return _finish(graph, model, dtype, PREPAD_ATTENTION, "the model uses it for more than attention", tail)


def count_plugin_nodes(model, name: str = VARLEN_ATTENTION.name) -> int:
    """How many nodes of plugin ``name`` an ``onnx.ModelProto`` holds."""
    return sum(1 for n in model.graph.node if n.op_type == name)
