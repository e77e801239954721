"""GPT-2: every export form rewritten to pre-padding attention; greedy generation through the rewritten graph
(plugin references) on a left-padded batch reproduces Hugging Face prompt by prompt."""
import json

import numpy as np
import onnx
import pytest

from eet.errors import EetError
from eet.exporter import gpt2, rewrite
from eet.runtime.generation import ReferenceStep, greedy

FORMS = ["eager", "sdpa", "onnx-attention"]
HEADS, HEAD_DIM, LAYERS, MAX_LEN = 2, 64, 2, 64


@pytest.fixture(scope="module")
def gpt2_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2cfg") / "config.json"
    # wide init: peaked attention and logits, so a wrong mask, position or pad shows in the tokens
    path.write_text(json.dumps(dict(model_type="gpt2", vocab_size=500, n_embd=HEADS * HEAD_DIM, n_layer=LAYERS,
                                    n_head=HEADS, n_positions=128, initializer_range=0.1)))
    return path


@pytest.fixture(scope="module")
def exported_gpt2(tmp_path_factory, gpt2_config_file):
    cache = {}

    def get(form):
        if form not in cache:
            loaded = gpt2.load_gpt2(config=str(gpt2_config_file), attn_implementation=gpt2.EXPORT_FORMS[form][0])
            path = tmp_path_factory.mktemp(f"gpt2-{form}") / "original.onnx"
            gpt2.export_onnx(loaded, path, form)
            cache[form] = (loaded, path)
        return cache[form]

    return get


def hf_alone(model, prompts, new_tokens):
    """Hugging Face greedy tokens for each prompt alone (explicit all-ones mask: without it, generate would
    treat prompt tokens equal to pad_token_id as padding)."""
    import torch

    with torch.no_grad():
        return [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)[0, len(p):].tolist() for p in prompts]


@pytest.mark.parametrize("form", FORMS)
def test_every_layer_rewritten(exported_gpt2, form):
    _, path = exported_gpt2(form)
    model = rewrite.rewrite_gpt2(onnx.load(str(path)), num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM)
    ops = [n.op_type for n in model.graph.node]
    assert rewrite.count_plugin_nodes(model, "EetPrePadAttention") == LAYERS
    assert "Softmax" not in ops and "Attention" not in ops
    weights = {i.name for i in model.graph.initializer}
    weights |= {n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in weights}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            assert node.input[1] in weights, f"activation x activation product left: {node.name}"
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "pad_lengths", "step"]
    assert names[3:] == [f"past_{k}.{i}" for i in range(LAYERS) for k in ("key", "value")]
    assert [o.name for o in model.graph.output] == ["next_token", "logits"]


@pytest.mark.parametrize("form", FORMS)
def test_batched_greedy_equals_each_prompt_alone(exported_gpt2, form, rng):
    loaded, path = exported_gpt2(form)
    model = rewrite.rewrite_gpt2(onnx.load(str(path)), num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM)
    prompts = [rng.integers(0, 500, int(n)).tolist() for n in (rng.integers(2, 20), 1, 20, rng.integers(1, 20))]
    step = ReferenceStep(model, num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM, max_len=MAX_LEN)
    tokens, _ = greedy(step, prompts, 10)
    assert tokens == hf_alone(loaded.model, prompts, 10)


def test_fp16_graph_generates(exported_gpt2, rng):
    loaded, path = exported_gpt2("sdpa")
    model = rewrite.rewrite_gpt2(onnx.load(str(path)), num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM,
                                 dtype="fp16")
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert inputs["past_key.0"] == onnx.TensorProto.FLOAT16 and inputs["input_ids"] == onnx.TensorProto.INT32
    prompts = [rng.integers(0, 500, int(n)).tolist() for n in (5, 1, 12)]
    step = ReferenceStep(model, num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM, max_len=MAX_LEN)
    tokens, logits = greedy(step, prompts, 6)
    assert logits[0].dtype == np.float16 and np.isfinite(logits[0]).all()
    # the first step comes from the prompt alone: its fp16 logits must be within the fp16 logit tolerance of
    # Hugging Face fp32 (relative to the largest logit), and its token may differ only at a near-tie there
    import torch

    from eet.commands.check import LOGIT_TOLERANCES

    bound = LOGIT_TOLERANCES["fp16"]
    for row, p in enumerate(prompts):
        with torch.no_grad():
            ref = loaded.model(torch.tensor([p])).logits[0, -1].double().numpy()
        scale = np.abs(ref).max()
        assert np.abs(logits[0][row].astype(np.float64) - ref).max() / scale <= bound
        top = np.sort(ref)[::-1]
        if tokens[row][0] != int(ref.argmax()):
            assert (top[0] - top[1]) / scale <= 2 * bound, (row, (top[0] - top[1]) / scale)


def plugin_qkv_producers(model):
    """For each EetPrePadAttention node: the op type producing its qkv input (None for a graph input)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    return [getattr(producers.get(n.input[0]), "op_type", None) for n in model.graph.node
            if n.op_type == "EetPrePadAttention"]


@pytest.mark.parametrize("form", FORMS)
def test_every_layer_reads_the_fused_projection(exported_gpt2, form):
    """Every export form cuts c_attn's output into q, k, v with one Split: the plugin reads the uncut tensor
    (no Split, Slice or Concat feeds it, and the Splits die)."""
    _, path = exported_gpt2(form)
    original = onnx.load(str(path))
    assert sum(n.op_type == "Split" for n in original.graph.node) == LAYERS
    model = rewrite.rewrite_gpt2(original, num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM)
    producers = plugin_qkv_producers(model)
    assert len(producers) == LAYERS
    assert not {"Split", "Slice", "Concat"} & set(producers), producers
    assert not any(n.op_type == "Split" for n in model.graph.node)


def test_concat_fallback_generates(exported_gpt2, monkeypatch, rng):
    """Without the fused match every layer concatenates q, k, v; greedy generation still equals Hugging Face."""
    loaded, path = exported_gpt2("sdpa")
    monkeypatch.setattr(rewrite, "fused_qkv", lambda match, hidden: None)
    model = rewrite.rewrite_gpt2(onnx.load(str(path)), num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM)
    assert plugin_qkv_producers(model) == ["Concat"] * LAYERS
    prompts = [rng.integers(0, 500, int(n)).tolist() for n in (rng.integers(2, 20), 1, 20)]
    step = ReferenceStep(model, num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM, max_len=MAX_LEN)
    tokens, _ = greedy(step, prompts, 8)
    assert tokens == hf_alone(loaded.model, prompts, 8)


def attention_graph(kind, batch, seq, embed, rng):
    """One causal eager attention ``x [B, S, E] -> [B, S, hidden]`` whose q, k, v come from: three MatMuls
    (``separate``; ``separate-bias``: each plus a bias, the key's Add with the bias first; ``separate-relu``: the
    value through a Relu, so not a projection), one MatMul cut by a Split with sizes (``split``; ``split-swapped``
    feeds its first two thirds to k and q) or into three even parts on axis 2 (``split-even``), or three Slices
    of one MatMul (``slices``; ``slices-wide``: the first three quarters of a MatMul 4 * hidden wide). Returns
    the model and the projections of q, k, v as functions of x."""
    from onnx import TensorProto, helper, numpy_helper

    hidden = HEADS * HEAD_DIM
    width = (4 if kind == "slices-wide" else 3) * hidden
    weights = (rng.standard_normal((embed, width)) / np.sqrt(embed)).astype(np.float32)
    inits = [numpy_helper.from_array(np.array([batch, seq, HEADS, HEAD_DIM], np.int64), "heads_shape"),
             numpy_helper.from_array(np.array([batch, seq, hidden], np.int64), "merged_shape"),
             numpy_helper.from_array(np.array(1 / np.sqrt(HEAD_DIM), np.float32), "scale"),
             numpy_helper.from_array(np.triu(np.full((seq, seq), -1e9, np.float32), 1), "causal")]
    nodes = []
    thirds = [weights[:, i * hidden:(i + 1) * hidden] for i in range(3)]
    biases = [np.zeros(hidden, np.float32)] * 3
    relu = kind == "separate-relu"
    if kind.startswith("separate"):
        if kind == "separate-bias":
            biases = [rng.standard_normal(hidden).astype(np.float32) for _ in range(3)]
        for name, w, b in zip("qkv", thirds, biases):
            inits.append(numpy_helper.from_array(w, f"w_{name}"))
            product = f"{name}_product" if kind != "separate" else name
            nodes.append(helper.make_node("MatMul", ["x", f"w_{name}"], [product]))
            if kind == "separate-bias":
                inits.append(numpy_helper.from_array(b, f"b_{name}"))
                operands = [f"b_{name}", product] if name == "k" else [product, f"b_{name}"]
                nodes.append(helper.make_node("Add", operands, [name]))
            elif kind == "separate-relu":
                nodes.append(helper.make_node("Relu" if name == "v" else "Identity", [product], [name]))
    else:
        inits.append(numpy_helper.from_array(weights, "w_qkv"))
        nodes.append(helper.make_node("MatMul", ["x", "w_qkv"], ["fused"]))
        if kind.startswith("slices"):
            for i, name in enumerate("qkv"):
                inits += [numpy_helper.from_array(np.array([i * hidden], np.int64), f"start_{name}"),
                          numpy_helper.from_array(np.array([(i + 1) * hidden], np.int64), f"end_{name}"),
                          numpy_helper.from_array(np.array([-1], np.int64), f"axes_{name}")]
                nodes.append(helper.make_node("Slice", ["fused", f"start_{name}", f"end_{name}", f"axes_{name}"],
                                              [name]))
        elif kind == "split-even":
            nodes.append(helper.make_node("Split", ["fused"], ["q", "k", "v"], axis=2, num_outputs=3))
        else:
            inits.append(numpy_helper.from_array(np.array([hidden] * 3, np.int64), "split_sizes"))
            outputs = ["k", "q", "v"] if kind == "split-swapped" else ["q", "k", "v"]
            nodes.append(helper.make_node("Split", ["fused", "split_sizes"], outputs, axis=-1))
            if kind == "split-swapped":
                thirds = [thirds[1], thirds[0], thirds[2]]
    for name, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        nodes += [helper.make_node("Reshape", [name, "heads_shape"], [f"{name}_heads"]),
                  helper.make_node("Transpose", [f"{name}_heads"], [f"{name}_t"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["q_t", "k_t"], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Add", ["scaled", "causal"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v_t"], ["context_heads"]),
              helper.make_node("Transpose", ["context_heads"], ["context_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["context_t", "merged_shape"], ["context"])]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [batch, seq, embed])],
                              [helper.make_tensor_value_info("context", TensorProto.FLOAT, [batch, seq, hidden])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    def projection(i):
        def f(x):
            y = x.astype(np.float64) @ thirds[i] + biases[i]
            return np.maximum(y, 0.0) if relu and i == 2 else y
        return f

    return onnx.shape_inference.infer_shapes(model), [projection(i) for i in range(3)]


@pytest.mark.parametrize("kind,producer", [
    ("separate", "Add"), ("separate-bias", "Add"), ("separate-relu", "Concat"), ("split", "MatMul"),
    ("split-swapped", "Concat"), ("split-even", "MatMul"), ("slices", "MatMul"), ("slices-wide", "Concat")])
def test_qkv_input_by_structure(kind, producer, rng):
    """The plugin reads the cut tensor where q, k, v are its thirds in order (a MatMul's output), one projection
    made of three where they are three projections of x (its bias Add's output), else a Concat of q, k, v. The
    reference evaluator shows each to be correct: causal attention of the right q, k, v, and the new keys and
    values in the caches."""
    import onnx_graphsurgeon as gs

    from eet.plugins.onnx_reference import evaluator

    batch, seq, embed, max_len = 2, 5, 48, 8
    model, projections = attention_graph(kind, batch, seq, embed, rng)
    graph = gs.import_onnx(model)
    (match,) = rewrite.find_attention(graph, HEAD_DIM)
    pads = gs.Variable(rewrite.PAD_LENGTHS, dtype=np.int32, shape=[batch])
    step = gs.Variable(rewrite.STEP, dtype=np.int32, shape=[1])
    graph.inputs.extend([pads, step])
    node = rewrite.replace_prepad_attention(graph, match, 0, pads, step, HEADS, HEAD_DIM)
    node.outputs[1].dtype = node.outputs[2].dtype = np.float32
    graph.outputs = [node.outputs[0], *node.outputs[1:]]
    graph.cleanup().toposort()
    rewritten = gs.export_onnx(graph)
    rewritten.opset_import.append(onnx.helper.make_opsetid("eet", 1))
    producers = plugin_qkv_producers(rewritten)
    assert producers == [producer]
    if producer != "Concat":  # the cut, or the three projections, died
        assert not any(n.op_type in ("Split", "Slice") for n in rewritten.graph.node)
        assert sum(n.op_type == "MatMul" and n.input[0] == "x" for n in rewritten.graph.node) == 1

    x = rng.standard_normal((batch, seq, embed)).astype(np.float32)
    caches = {f"past_{k}.0": np.zeros((batch, HEADS, max_len, HEAD_DIM), np.float32) for k in ("key", "value")}
    context, keys, values = evaluator(rewritten).run(None, {"x": x, "pad_lengths": np.zeros(batch, np.int32),
                                                            "step": np.zeros(1, np.int32), **caches})

    def heads(projection):  # [B, H, S, D] in float64
        return projection(x).reshape(batch, seq, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)

    q, k, v = (heads(f) for f in projections)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD_DIM) + np.triu(np.full((seq, seq), -np.inf), 1)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(batch, seq, HEADS * HEAD_DIM)
    np.testing.assert_allclose(context, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(keys[:, :, :seq], k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(values[:, :, :seq], v, rtol=1e-5, atol=1e-5)
    assert not keys[:, :, seq:].any() and not values[:, :, seq:].any()


def test_unmatched_layer_is_named(exported_gpt2):
    _, path = exported_gpt2("eager")
    model = onnx.load(str(path))
    node = [n for n in model.graph.node if n.op_type == "Softmax"][0]
    relu = onnx.helper.make_node("Relu", [node.input[0]], [node.input[0] + "_relu"], name="odd_relu")
    node.input[0] = relu.output[0]
    model.graph.node.insert(list(model.graph.node).index(node), relu)
    with pytest.raises(EetError, match=r"layer 0 .*Relu"):
        rewrite.rewrite_gpt2(model, num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM)


def test_bert_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(EetError, match=r"'bert' model, not GPT-2; use `eet build bert`"):
        gpt2.load_gpt2(tmp_path)


def expected_sample(logits, temperature, top_k, top_p, u, candidates):
    """NumPy statement of the engine's sampling rule (see rewrite.sampling_head), in float64."""
    order = np.argsort(-logits.astype(np.float64), kind="stable")[:candidates]
    scaled = logits[order].astype(np.float64) / max(temperature, 1e-6)
    keep = np.arange(candidates) < (min(top_k, candidates) if top_k > 0 else candidates)
    scaled[~keep] = -np.inf
    p = np.exp(scaled - scaled.max())
    p /= p.sum()
    p[(np.cumsum(p) - p) >= top_p] = 0
    cdf = np.cumsum(p) / p.sum()
    return int(order[min(int((cdf < u).sum()), candidates - 1)])


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 8, 1.0), (1.0, 0, 0.6), (0.9, 20, 0.8)])
def test_sampling_in_the_graph(exported_gpt2, rng, temperature, top_k, top_p):
    from eet.runtime.generation import Sampling, generate

    _, path = exported_gpt2("sdpa")
    candidates = 32
    model = rewrite.rewrite_gpt2(onnx.load(str(path)), num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM,
                                 sampling_candidates=candidates)
    assert [i.name for i in model.graph.input][-4:] == ["temperature", "top_k", "top_p", "uniform"]
    prompts = [rng.integers(0, 500, int(n)).tolist() for n in (6, 1, 11)]
    seed = int(rng.integers(2**31))
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    step = ReferenceStep(model, num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM, max_len=MAX_LEN)
    tokens, logits = generate(step, prompts, 8, sampling=sampling)
    draws = np.random.default_rng(seed)
    for i, step_logits in enumerate(logits):
        u = sampling.feeds(draws, len(prompts))["uniform"]
        for row in range(len(prompts)):
            want = expected_sample(step_logits[row], temperature, top_k, top_p, float(u[row]), candidates)
            assert tokens[row][i] == want, (row, i)
    again, _ = generate(step, prompts, 8, sampling=sampling)
    assert again == tokens  # the seed fixes the draws
    greedy_tokens, _ = greedy(step, prompts, 8)  # temperature 0: the greedy token
    assert greedy_tokens == hf_alone(exported_gpt2("sdpa")[0].model, prompts, 8)


def test_export_with_past_matches_huggingface(gpt2_config_file, tmp_path, rng):
    """The plain baseline's export (KV cache as inputs and outputs): one decode step in ONNX Runtime equals
    Hugging Face's step with the same cache, logits and presents, on a left-padded batch."""
    import onnxruntime as ort
    import torch

    from eet.exporter.common import cache_kwargs, cache_tensors, output_cache

    loaded = gpt2.load_gpt2(config=str(gpt2_config_file))
    path = gpt2.export_onnx_with_past(loaded, tmp_path / "with-past.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "position_ids",
                                                      *gpt2.past_names(LAYERS)]
    batch, past = 3, int(rng.integers(2, 20))
    ids = torch.from_numpy(rng.integers(0, 500, (batch, past)))
    mask = torch.ones(batch, past + 1, dtype=torch.long)
    mask[1, : past // 2] = 0  # a left-padded row
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    new = torch.from_numpy(rng.integers(0, 500, (batch, 1)))
    model = loaded.model
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, attention_mask=mask[:, :past], position_ids=positions[:, :past],
                                   use_cache=True))
        feeds = {name: t.numpy() for name, t in zip(gpt2.past_names(LAYERS), cache_tensors(cache))}
        step = model(input_ids=new, attention_mask=mask, position_ids=positions[:, past:], use_cache=True,
                     **cache_kwargs(model, cache))
    got = session.run(None, {"input_ids": new.numpy(), "attention_mask": mask.numpy(),
                             "position_ids": positions[:, past:].numpy(), **feeds})
    want = [step.logits[:, -1].numpy()] + [x.numpy() for x in cache_tensors(output_cache(step))]
    assert got[1].shape == (batch, HEADS, past + 1, HEAD_DIM)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def test_cache_tensors_reads_every_cache_form():
    """Hugging Face KV caches across transformers versions: Cache.layers (>= 4.56), key_cache / value_cache
    lists (before), and the legacy tuple of (key, value) pairs (GPT-2 under torch.export in 4.48)."""
    from types import SimpleNamespace

    from eet.exporter.common import cache_tensors

    keys, values = ["k0", "k1"], ["v0", "v1"]
    want = ["k0", "v0", "k1", "v1"]
    layers = SimpleNamespace(layers=[SimpleNamespace(keys=k, values=v) for k, v in zip(keys, values)])
    lists = SimpleNamespace(key_cache=keys, value_cache=values)
    legacy = tuple(zip(keys, values))
    assert cache_tensors(layers) == cache_tensors(lists) == cache_tensors(legacy) == want
