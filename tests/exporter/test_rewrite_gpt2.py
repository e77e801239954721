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
        return [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)[0, len(p):].tolist() for p in prompts]


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

    from eet.exporter.common import cache_kwargs, output_cache

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
        feeds = {name: t.numpy() for name, t in zip(gpt2.past_names(LAYERS),
                                                    [x for layer in cache.layers for x in (layer.keys, layer.values)])}
        step = model(input_ids=new, attention_mask=mask, position_ids=positions[:, past:], use_cache=True,
                     **cache_kwargs(model, cache))
    got = session.run(None, {"input_ids": new.numpy(), "attention_mask": mask.numpy(),
                             "position_ids": positions[:, past:].numpy(), **feeds})
    want = [step.logits[:, -1].numpy()] + [x.numpy() for layer in output_cache(step).layers
                                            for x in (layer.keys, layer.values)]
    assert got[1].shape == (batch, HEADS, past + 1, HEAD_DIM)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())
