"""eet.runtime on a GPU: load() a plan built the way a CPU machine builds it, encode() / generate() against
Hugging Face PyTorch on the same GPU, CUDA-graph decode, EOS, streaming, sampling, and the load-time errors.

On an H100/H200 with TensorRT-RTX this needs the test shim (EET_CC_SHIM, see tests/conftest.py), passed to
load() as its deserialize_hook; the runtime itself never loads it."""
import json

import numpy as np
import pytest

from conftest import CC_SHIM, GPU_CONFIGS, build_like_cpu, skip_unless_engine_gpu

pytestmark = pytest.mark.gpu
skip_unless_engine_gpu()
pytest.importorskip("pycuda")

BERT, GPT2 = GPU_CONFIGS["bert"], GPU_CONFIGS["gpt2"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(family, dtype, *args):
        key = (family, dtype, args)
        if key not in cache:
            cache[key] = build_like_cpu(tmp_path_factory.mktemp(family), family, dtype, *args)
        return cache[key]

    return get


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_encode_matches_huggingface(built, dtype, deserialize_hook, rng):
    import torch

    import eet.runtime
    from eet.commands.check import load_reference_model

    out = built("bert", dtype, "--max-batch", "8", "--max-tokens", "2048", "--max-seq", "384")
    lengths = [1, 384] + rng.integers(1, 385, size=18).tolist()  # 20 sequences: more than one call
    seqs = [rng.integers(0, BERT["vocab_size"], n).tolist() for n in lengths]
    types = [rng.integers(0, 2, n).tolist() for n in lengths]
    with eet.runtime.load(out, deserialize_hook=deserialize_hook) as engine:
        enc = engine.encode(seqs, token_type_ids=types)
        again = engine.encode(seqs[3:5], token_type_ids=types[3:5])
        # --max-batch sequences in one call: the plan leaves room for the shape bucket's filler
        short = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))[:8]
        assert sum(len(seqs[i]) for i in short) <= 2048
        full = engine.encode([seqs[i] for i in short], token_type_ids=[types[i] for i in short])
        # output="torch": the same calls, outputs copied device to device into CUDA tensors; issued from a side
        # stream whose queue holds a long GEMM first (the copies must wait for PyTorch's stream and the results be
        # ready in its order), and read only through that stream
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            big = torch.randn(4096, 4096, device="cuda")
            for _ in range(8):
                big = big @ big * 1e-2
            dev = engine.encode(seqs, token_type_ids=types, output="torch")
            dev_hidden = [h.cpu().numpy() for h in dev.hidden_states]
            dev_first, dev_pooled = dev.first_token.cpu().numpy(), dev.mean_pooled().cpu().numpy()
    assert dev.calls == enc.calls and all(h.is_cuda for h in dev.hidden_states)
    assert dev.first_token.dtype == torch.float32
    assert [h.shape for h in dev_hidden] == [h.shape for h in enc.hidden_states]
    dev_diff = max(float(np.abs(a.astype(np.float32) - b).max()) for a, b in zip(dev_hidden, enc.hidden_states))
    pooled_diff = float(np.abs(dev_pooled - enc.mean_pooled()).max())
    print(f"encode {dtype}: output='torch' vs 'numpy' (same calls): max abs difference {dev_diff:.2e} hidden, "
          f"{float(np.abs(dev_first - enc.first_token).max()):.2e} first token, {pooled_diff:.2e} mean-pooled")
    # the same shapes run the same kernels: equal but for split-K accumulation order (fp16: a unit in the last place)
    assert dev_diff <= {"fp32": 1e-4, "fp16": 4e-3}[dtype] and pooled_diff <= 1e-3
    assert enc.calls >= 3 and len(enc.hidden_states) == len(seqs) and full.calls == 1
    model = load_reference_model(json.loads((out / "engine.json").read_text())).model.cuda().double()
    worst = worst_first = 0.0
    refs = []
    with torch.no_grad():
        for s, t, h, f in zip(seqs, types, enc.hidden_states, enc.first_token):
            ref = model(input_ids=torch.tensor([s]).cuda(), token_type_ids=torch.tensor([t]).cuda()
                        ).last_hidden_state[0].cpu().numpy()
            refs.append(ref)
            assert h.shape == ref.shape and np.isfinite(h).all()
            worst = max(worst, float(np.abs(h - ref).max()))
            worst_first = max(worst_first, float(np.abs(f - ref[0]).max()))
    bound = {"fp32": 2e-2, "fp16": 6e-2}[dtype]  # TF32 / fp16 GEMMs over 3 layers of hidden 256 (see RATIO)
    print(f"encode {dtype}: {len(seqs)} sequences in {enc.calls} calls; max abs error vs Hugging Face fp64 "
          f"hidden {worst:.2e}, first token {worst_first:.2e} (bound {bound})")
    assert worst <= bound and worst_first <= bound
    # The same sequence in another batch: TensorRT-RTX specializes kernels per shape, so another token count may
    # run other GEMM kernels, fp16 and fp32 (TF32) alike, and the sequence must meet the same bound. (fp32 often
    # gives the very same numbers, but not always: on an H100, seed 2595016694 gave 1.87e-3 between the two
    # batches, with 3.4e-3 against Hugging Face fp64.)
    again_err = float(np.abs(again.hidden_states[0] - refs[3]).max())
    print(f"encode {dtype}: sequence 3 in a batch of 2: max abs error {again_err:.2e}, "
          f"{float(np.abs(again.hidden_states[0] - enc.hidden_states[3]).max()):.2e} from the batch of 20")
    assert again_err <= bound
    full_err = max(float(np.abs(h - refs[i]).max()) for i, h in zip(short, full.hidden_states))
    print(f"encode {dtype}: the 8 shortest sequences in one call: max abs error {full_err:.2e}")
    assert full_err <= bound


def hf_alone(model, prompts, new):
    import torch

    tokens, margins = [], []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True, output_logits=True)
            tokens.append(out.sequences[0, len(p):].tolist())
            top = [np.sort(x[0].numpy())[::-1] for x in out.logits]
            margins.append([float((t[0] - t[1]) / np.abs(t).max()) for t in top])
    return tokens, margins


@pytest.mark.parametrize("graphs", ["off", "stream", "engine"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_generate_matches_huggingface(built, dtype, graphs, deserialize_hook, rng):
    import eet.runtime
    from eet.commands.check import load_reference_model

    out = built("gpt2", dtype, "--max-batch", "8", "--max-prompt", "64", "--max-len", "128")
    lengths = [1, 64] + rng.integers(1, 65, size=6).tolist()
    prompts = [rng.integers(0, GPT2["vocab_size"], n).tolist() for n in lengths]
    new = 24
    with eet.runtime.load(out, deserialize_hook=deserialize_hook, cuda_graphs=graphs) as engine:
        got = engine.generate(prompts, new, eos_token_id=None).tokens
        assert engine.generate(prompts, new, eos_token_id=None).tokens == got  # replays agree
        # another batch size (4 rows with shape buckets: 3 prompts and a filler); its GEMMs may take other kernels
        small = engine.generate(prompts[:3], 5, eos_token_id=None).tokens
    want, margins = hf_alone(load_reference_model(json.loads((out / "engine.json").read_text())).model, prompts, new)
    agree = float(np.mean(np.array(got) == np.array(want)))

    def divergences(rows):
        return [(r, next(i for i, (a, b) in enumerate(zip(g, w)) if a != b)) for r, (g, w) in enumerate(zip(rows, want))
                if g != w[:len(g)]]

    diverged, diverged_small = divergences(got), divergences(small)
    print(f"generate {dtype}, graphs {graphs}: prompts {lengths}, {new} new tokens; agreement with Hugging Face "
          f"alone {agree:.1%}; first divergences (row, step, HF top-2 margin): "
          f"{[(r, s, round(margins[r][s], 5)) for r, s in diverged]}; batch of 3, +5: "
          f"{[(r, s, round(margins[r][s], 5)) for r, s in diverged_small]}")
    # A row may leave Hugging Face's tokens only where Hugging Face's own top two logits nearly tie (relative to
    # the largest logit): in fp16, and in fp32 too, since TensorRT-RTX runs fp32 GEMMs in TF32 (README).
    # (The agreement rate itself is not bounded: one row that leaves at a tie in its first steps takes 23 of the
    # 192 tokens with it; an H100 run saw 88.5% from row 7 leaving at step 1 over a 2.6e-4 margin.)
    limit = 5e-3 if dtype == "fp32" else 5e-2
    assert all(margins[r][s] < limit for r, s in diverged + diverged_small), (diverged, diverged_small)


@pytest.mark.parametrize("graphs", ["off", "stream", "engine"])
def test_pipelined_generate_equals_step_by_step(built, graphs, deserialize_hook, rng):
    """generate() submits each decode step before it reads the previous one's tokens, which the step copies
    back on the GPU; a loop that runs every step to completion with the token ids from the host gives the same
    tokens and logits."""
    import eet.runtime
    from eet.runtime.generation import iterate

    out = built("gpt2", "fp16", "--max-batch", "8", "--max-prompt", "64", "--max-len", "128")
    lengths = [64, 1] + rng.integers(1, 65, size=6).tolist()
    prompts = [rng.integers(0, GPT2["vocab_size"], n).tolist() for n in lengths]
    with eet.runtime.load(out, deserialize_hook=deserialize_hook, cuda_graphs=graphs) as engine:
        piped = engine.generate(prompts, 20, eos_token_id=None, return_logits=True)
        engine.want_logits = True
        plain = list(iterate(lambda ids, pads, position, extra: engine(ids, pads, position, extra), prompts, 20))
        engine.want_logits = False
        again = engine.generate(prompts[:5], 6, eos_token_id=None)  # another batch size after the plain loop
    assert piped.tokens == np.array([s.tokens for s in plain]).T.tolist()
    assert again.tokens == [t[:6] for t in piped.tokens[:5]]
    worst = max(float(np.abs(a - s.logits).max()) for a, s in zip(piped.logits, plain))
    print(f"pipelined vs step-by-step generate (fp16, graphs {graphs}): tokens equal, max logit difference {worst:.2e}")
    assert worst <= 1e-2


def test_eos_and_streaming(built, deserialize_hook, rng):
    import eet.runtime

    out = built("gpt2", "fp32", "--max-batch", "8", "--max-prompt", "64", "--max-len", "128")
    prompts = [rng.integers(0, GPT2["vocab_size"], n).tolist() for n in (5, 17, 3)]
    with eet.runtime.load(out, deserialize_hook=deserialize_hook) as engine:
        full = engine.generate(prompts, 20, eos_token_id=None)
        eos = full.tokens[1][4]  # row 1 stops at its 5th token; the other rows stop where they produce it
        steps = []
        stopped = engine.generate(prompts, 20, eos_token_id=eos, on_step=steps.append)
        streamed = [s.tokens.tolist() for s in engine.stream(prompts, 20, eos_token_id=None)]
    for row, tokens in enumerate(full.tokens):
        cut = tokens[: tokens.index(eos) + 1] if eos in tokens else tokens
        assert stopped.tokens[row] == cut
    assert len(steps) == max(len(t) for t in stopped.tokens) and steps[-1].finished.all() == (
        all(eos in t for t in full.tokens))
    assert np.array(streamed).T.tolist() == full.tokens


def test_sampling_in_engine(built, deserialize_hook, rng):
    import eet.runtime
    from eet.errors import EetError

    out = built("gpt2", "fp32", "--max-batch", "8", "--max-prompt", "64", "--max-len", "128",
                "--sample-candidates", "16")
    prompts = [rng.integers(0, GPT2["vocab_size"], n).tolist() for n in (7, 30, 1, 12)]
    with eet.runtime.load(out, deserialize_hook=deserialize_hook) as engine:
        greedy = engine.generate(prompts, 12, eos_token_id=None)
        a = engine.generate(prompts, 12, temperature=1.0, top_k=8, seed=3, eos_token_id=None, return_logits=True)
        b = engine.generate(prompts, 12, temperature=1.0, top_k=8, seed=3, eos_token_id=None)
        c = engine.generate(prompts, 12, temperature=1.0, top_k=1, seed=4, eos_token_id=None)
        with pytest.raises(EetError, match="exceeds the engine's --sample-candidates"):
            engine.generate(prompts, 4, temperature=1.0, top_k=17)
    assert a.tokens == b.tokens  # same seed, same tokens
    assert c.tokens == greedy.tokens  # top-k 1 is greedy
    # every sampled token is among the 8 most likely of its step
    for step, logits in enumerate(a.logits):
        for row in range(len(prompts)):
            top8 = np.argsort(logits[row])[::-1][:8]
            assert a.tokens[row][step] in top8
    assert a.tokens != greedy.tokens


def test_load_errors(built, tmp_path, deserialize_hook):
    import shutil

    import eet.runtime
    from eet.errors import EetError

    out = built("gpt2", "fp32", "--max-batch", "8", "--max-prompt", "64", "--max-len", "128")
    if CC_SHIM is not None:  # a GPU the flavour does not list: named, with its compute capability
        with pytest.raises(EetError, match=r"cannot run this plan on GPU 0 \(.*compute capability \d+\.\d+"):
            eet.runtime.load(out)
    bad = tmp_path / "altered"
    shutil.copytree(out, bad)
    info = json.loads((bad / "engine.json").read_text())
    info["tensorrt"]["version"] = "0.0.1"
    (bad / "engine.json").write_text(json.dumps(info))
    with pytest.raises(EetError, match="plans are tied to the TensorRT version"):
        eet.runtime.load(bad, deserialize_hook=deserialize_hook)
    with open(bad / "engine.plan", "ab") as f:
        f.write(b"x")
    with pytest.raises(EetError, match="does not match its sidecar"):
        eet.runtime.load(bad, deserialize_hook=deserialize_hook)
    with eet.runtime.load(out, deserialize_hook=deserialize_hook) as engine:
        with pytest.raises(EetError, match="exceed the engine's --max-batch"):
            engine.generate([[1]] * 9, 2)
        with pytest.raises(EetError, match="no prompts"):
            engine.generate([], 2)
        with pytest.raises(EetError, match="exceeds the engine's --max-len"):
            engine.generate([[1] * 64], 65)
        with pytest.raises(EetError, match="no tokenizer"):
            engine.generate(["hello"], 2)
    with pytest.raises(EetError, match="closed"):
        engine.generate([[1]], 2)


def test_runtime_cache_round_trip(built, tmp_path, deserialize_hook, rng):
    """The kernels TensorRT-RTX compiles in one load() are written to DIR/runtime_cache/ at close and read by
    the next load() (no warning), with the same tokens; the first generate() of each load is timed (printed)."""
    import shutil
    import time
    import warnings

    import eet.runtime

    out = tmp_path / "engine"
    shutil.copytree(built("gpt2", "fp16", "--max-batch", "8", "--max-prompt", "64", "--max-len", "128"), out)
    shutil.rmtree(out / "runtime_cache", ignore_errors=True)
    prompts = [rng.integers(0, GPT2["vocab_size"], int(n)).tolist() for n in rng.integers(1, 65, size=5)]
    runs = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:  # a rejected or unwritable cache warns
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            with eet.runtime.load(out, deserialize_hook=deserialize_hook) as engine:
                t1 = time.perf_counter()
                tokens = engine.generate(prompts, 8, eos_token_id=None).tokens
                t2 = time.perf_counter()
                loaded = len(engine.runtime_cache.on_disk)
        assert not [w for w in caught if "runtime cache" in str(w.message)]
        files = list((out / "runtime_cache").iterdir())
        runs.append((tokens, loaded, t1 - t0, t2 - t1))
        assert len(files) == 1 and files[0].stat().st_size > 0 and files[0].name.startswith(
            json.loads((out / "engine.json").read_text())["plan_sha256"][:16])
    (cold, cold_loaded, *cold_t), (warm, warm_loaded, *warm_t) = runs
    print(f"runtime cache: load {cold_t[0]:.2f} s, first generate {cold_t[1]:.2f} s with none; load "
          f"{warm_t[0]:.2f} s, first generate {warm_t[1]:.2f} s with the file of the first load ({warm_loaded} B)")
    assert cold_loaded == 0 and warm_loaded > 0 and warm == cold


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_warm_up_leaves_requests_nothing_to_compile(built, family, tmp_path, deserialize_hook, rng):
    """After warm_up(), requests of random sizes within the shape buckets make TensorRT-RTX compile nothing: the
    runtime cache's serialized bytes stay as warm_up() left them. The next load() reads the file warm_up() wrote,
    and its own warm_up() adds nothing to it (same size: TensorRT-RTX's serialization of a read-back cache differs
    from the file in a byte). Times printed."""
    import time

    import eet.runtime

    if family == "bert":
        folder = built("bert", "fp16", "--max-batch", "8", "--max-tokens", "2048", "--max-seq", "384")

        def request(engine):
            lengths = rng.integers(1, 385, int(rng.integers(1, 21)))
            engine.encode([rng.integers(0, BERT["vocab_size"], n).tolist() for n in lengths])
    else:
        folder = built("gpt2", "fp16", "--max-batch", "8", "--max-prompt", "64", "--max-len", "128")

        def request(engine):
            lengths = rng.integers(1, 65, int(rng.integers(1, 9)))
            engine.generate([rng.integers(0, GPT2["vocab_size"], n).tolist() for n in lengths],
                            int(rng.integers(1, 65)), eos_token_id=None)
    cache_file = tmp_path / "kernels.bin"
    with eet.runtime.load(folder, runtime_cache=cache_file, deserialize_hook=deserialize_hook) as engine:
        shapes = engine.warm_up()
        assert len(shapes) == len(engine.bucket_shapes()) and cache_file.is_file()
        warmed = bytes(engine.runtime_cache.cache.serialize())
        assert warmed == cache_file.read_bytes()
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            request(engine)
            times.append(time.perf_counter() - t0)
        assert bytes(engine.runtime_cache.cache.serialize()) == warmed
    with eet.runtime.load(folder, runtime_cache=cache_file, deserialize_hook=deserialize_hook) as engine:
        assert engine.runtime_cache.on_disk == warmed
        again = engine.warm_up()
        assert len(bytes(engine.runtime_cache.cache.serialize())) == len(warmed)
    print(f"{family}: warm_up() of {len(shapes)} buckets {sum(s.seconds for s in shapes):.2f} s (slowest "
          f"{max(shapes, key=lambda s: s.seconds)}); 8 random requests after it {[round(t * 1e3) for t in times]} "
          f"ms; warm_up() in the next load(), from the file: {sum(s.seconds for s in again):.2f} s")
