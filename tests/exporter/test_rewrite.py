"""The rewriter on every export form: one plugin per layer, no attention left, and the rewritten graph
(with plugin references) computes what ONNX Runtime computes on the original export."""
import numpy as np
import onnx
import pytest

from eet.commands.check import ragged_batch
from eet.errors import EetError
from eet.exporter import rewrite
from eet.plugins import onnx_reference

FORMS = ["eager", "sdpa", "onnx-attention"]


def run_both(path, model, rb):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (ref,) = sess.run(None, {"input_ids": rb.ids, "attention_mask": rb.mask, "token_type_ids": rb.token_types,
                             "position_ids": rb.positions})
    hidden, first = onnx_reference.evaluator(model).run(None, rb.packed_feeds())
    return ref, hidden.astype(np.float64), first.astype(np.float64)


@pytest.mark.parametrize("form", FORMS)
def test_every_layer_rewritten(exported, form):
    loaded, path = exported(form)
    model = rewrite.rewrite_bert(onnx.load(str(path)), num_layers=2, num_heads=2, head_dim=64)
    ops = [n.op_type for n in model.graph.node]
    assert rewrite.count_plugin_nodes(model) == 2
    assert "Softmax" not in ops and "Attention" not in ops
    # every MatMul left is a GEMM against weights: none multiplies two activations (Q K^T or P V)
    weights = {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            assert node.input[1] in weights, f"activation x activation MatMul left: {node.name}"
    assert [i.name for i in model.graph.input] == ["input_ids", "token_type_ids", "position_ids", "cu_seqlens",
                                                   "max_seqlen"]
    assert [o.name for o in model.graph.output] == ["hidden_states", "first_token_states"]


@pytest.mark.parametrize("form", FORMS)
def test_rewritten_matches_onnxruntime_fp32(exported, form, rng):
    loaded, path = exported(form)
    model = rewrite.rewrite_bert(onnx.load(str(path)), num_layers=2, num_heads=2, head_dim=64)
    rb = ragged_batch(rng, batch=5, max_len=40, vocab=1000)
    ref, hidden, first = run_both(path, model, rb)
    # fp32 throughout; the padded run and the packed run differ only in summation order
    np.testing.assert_allclose(hidden, rb.unpad(ref), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(first, ref[:, 0], atol=1e-4, rtol=1e-4)


def plugin_qkv_producers(model):
    """For each EetVarlenAttention node: the node producing its qkv input."""
    producers = {out: node for node in model.graph.node for out in node.output}
    return [producers.get(n.input[0]) for n in model.graph.node if n.op_type == "EetVarlenAttention"]


@pytest.mark.parametrize("form", FORMS)
def test_query_key_value_become_one_projection(exported, form):
    """BERT's query, key and value Linear layers of one LayerNorm output become one MatMul with the weights side
    by side and one bias Add, whose [.., 3 * hidden] output the plugin reads (three GEMMs and three bias adds
    per layer become one of each)."""
    loaded, path = exported(form)
    model = rewrite.rewrite_bert(onnx.load(str(path)), num_layers=2, num_heads=2, head_dim=64)
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    layer0 = loaded.model.encoder.layer[0].attention.self
    for add in plugin_qkv_producers(model):
        assert add.op_type == "Add"
        matmul, bias = producers[add.input[0]], weights[add.input[1]]
        assert matmul.op_type == "MatMul" and weights[matmul.input[1]].shape == (128, 3 * 128)
        assert bias.shape == (3 * 128,)
    # layer 0's fused weight and bias are the three Linear layers' side by side, in q, k, v order
    add = plugin_qkv_producers(model)[0]
    w = weights[producers[add.input[0]].input[1]]
    b = weights[add.input[1]]
    for i, linear in enumerate((layer0.query, layer0.key, layer0.value)):
        np.testing.assert_array_equal(w[:, i * 128:(i + 1) * 128], linear.weight.detach().numpy().T)
        np.testing.assert_array_equal(b[i * 128:(i + 1) * 128], linear.bias.detach().numpy())
    # per layer: the fused projection, the attention output, the two MLP layers
    assert sum(n.op_type == "MatMul" for n in model.graph.node) == 4 * 2


def test_unfused_projections_fall_back_to_a_concat(exported, monkeypatch, rng):
    """Where the projections are not of the fused form the plugin reads a Concat of q, k, v: still right."""
    loaded, path = exported("sdpa")
    monkeypatch.setattr(rewrite, "fuse_projections", lambda graph, match, index, hidden: None)
    model = rewrite.rewrite_bert(onnx.load(str(path)), num_layers=2, num_heads=2, head_dim=64)
    assert [n.op_type for n in plugin_qkv_producers(model)] == ["Concat"] * 2
    rb = ragged_batch(rng, batch=3, max_len=24, vocab=1000)
    ref, hidden, first = run_both(path, model, rb)
    np.testing.assert_allclose(hidden, rb.unpad(ref), atol=1e-4, rtol=1e-4)


def test_rewritten_fp16_keeps_layernorm_fp32(exported, rng):
    loaded, path = exported("sdpa")
    model = rewrite.rewrite_bert(onnx.load(str(path)), num_layers=2, num_heads=2, head_dim=64, dtype="fp16")
    producers = {o: n for n in model.graph.node for o in n.output}
    layernorms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(layernorms) == 5
    for node in layernorms:
        cast = producers[node.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == onnx.TensorProto.FLOAT
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT16}
    rb = ragged_batch(rng, batch=4, max_len=32, vocab=1000)
    ref, hidden, first = run_both(path, model, rb)
    # fp16 GEMMs and GELU between fp32 LayerNorms: errors of a few 1e-3 on unit-variance states
    np.testing.assert_allclose(hidden, rb.unpad(ref), atol=2e-2, rtol=2e-2)
    np.testing.assert_allclose(first, ref[:, 0], atol=2e-2, rtol=2e-2)


def _break_layer(model, layer):
    """Put a Relu between the scores and Softmax of one layer: a form the rewriter does not know."""
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    node = softmaxes[layer]
    relu = onnx.helper.make_node("Relu", [node.input[0]], [node.input[0] + "_relu"], name="odd_relu")
    node.input[0] = relu.output[0]
    model.graph.node.insert(list(model.graph.node).index(node), relu)
    return model


def test_unmatched_layer_is_named(exported):
    loaded, path = exported("eager")
    model = _break_layer(onnx.load(str(path)), 1)
    with pytest.raises(EetError, match=r"layer 1 .*Relu"):
        rewrite.rewrite_bert(model, num_layers=2, num_heads=2, head_dim=64)


def test_layer_count_mismatch(exported):
    loaded, path = exported("sdpa")
    with pytest.raises(EetError, match="found 2 attention subgraphs .* 3 layers"):
        rewrite.rewrite_bert(onnx.load(str(path)), num_layers=3, num_heads=2, head_dim=64)


def test_scale_is_recovered(exported):
    """sqrt(scale) on Q and on K (SDPA), scale on scores (eager), scale attribute (Attention op)."""
    for form in FORMS:
        loaded, path = exported(form)
        model = rewrite.rewrite_bert(onnx.load(str(path)), num_layers=2, num_heads=2, head_dim=64)
        for node in model.graph.node:
            if node.op_type == "EetVarlenAttention":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                assert attrs["scale"] == pytest.approx(0.125, rel=1e-6), form


def _masked_scores(kind: str):
    """MatMul(Q, K^T) / 8 -> Where masked fill (scores as its X or Y, or both operands from a MatMul) ->
    + additive mask -> Softmax: (the Softmax input, the Where output)."""
    import onnx_graphsurgeon as gs

    q, k = (gs.Variable(n, dtype=np.float32, shape=[2, 4, 8, 64]) for n in ("q", "k"))
    kt = gs.Variable("kt", dtype=np.float32)
    scores, scaled, filled, masked = (gs.Variable(n, dtype=np.float32) for n in ("s", "scaled", "filled", "masked"))
    mask = gs.Variable("causal", dtype=np.bool_, shape=[1, 1, 8, 8])
    fill = gs.Constant("fill", np.array(-1e30, np.float32))
    nodes = [gs.Node("Transpose", inputs=[k], outputs=[kt], attrs={"perm": [0, 1, 3, 2]}),
             gs.Node("MatMul", inputs=[q, kt], outputs=[scores]),
             gs.Node("Div", inputs=[scores, gs.Constant("eight", np.array(8.0, np.float32))], outputs=[scaled])]
    operands = {"x": [scaled, fill], "y": [fill, scaled], "both": [scaled, scores]}[kind]
    nodes.append(gs.Node("Where", inputs=[mask, *operands], outputs=[filled]))
    nodes.append(gs.Node("Add", inputs=[filled, gs.Constant("additive", np.zeros((2, 1, 1, 8), np.float32))],
                         outputs=[masked]))
    probs = gs.Variable("p", dtype=np.float32)
    nodes.append(gs.Node("Softmax", inputs=[masked], outputs=[probs], attrs={"axis": -1}))
    gs.Graph(nodes=nodes, inputs=[q, k, mask], outputs=[probs])
    return masked, filled


@pytest.mark.parametrize("kind", ["x", "y"])
def test_masked_fill_before_softmax_is_walked_through(kind):
    """transformers 4.x's eager GPT-2 fills its causal mask with Where before the additive mask; the rewriter
    walks through it to MatMul(Q, K^T) and keeps the scale, whichever side of the Where the scores stand on."""
    qk, scale = rewrite._scores_matmul(_masked_scores(kind)[0])
    assert qk.op == "MatMul" and qk.inputs[0].name == "q"
    assert scale == pytest.approx(1 / 8)


def test_where_with_two_score_operands_is_refused():
    softmax_input, where_output = _masked_scores("both")
    with pytest.raises(rewrite.NoMatch, match="2 operands of the Where before Softmax"):
        rewrite._scores_matmul(where_output)
    with pytest.raises(rewrite.NoMatch):  # and so the Add above it leads nowhere either
        rewrite._scores_matmul(softmax_input)
