"""eet.runtime logic that needs no GPU: packing and splitting BERT batches, the generation loop's EOS and
streaming control, sidecar / TensorRT / plugin compatibility, and the load-time errors on a machine without
PyCUDA or a GPU."""
import json

import numpy as np
import pytest

from eet.errors import EetError
from eet.runtime.bert import (BertLimits, bucket_limits, bucket_token_counts, check_batch, fill_to_bucket, pack,
                              plan_calls, token_bucket)
from eet.runtime.engine import check_compatible, unsupported_gpu_message
from fakes import FakeDevice, SavedCache

LIMITS = BertLimits(max_batch=4, max_tokens=100, max_seq=40, vocab_size=50)


def test_pack_restarts_positions_and_counts_tokens(rng):
    lengths = rng.integers(1, 40, size=7)
    seqs = [rng.integers(0, 50, n).tolist() for n in lengths]
    feeds = pack(seqs)
    assert feeds["cu_seqlens"].tolist() == [0] + np.cumsum(lengths).tolist()
    assert feeds["max_seqlen"] == lengths.max()
    for b, s in enumerate(seqs):
        lo, hi = feeds["cu_seqlens"][b], feeds["cu_seqlens"][b + 1]
        assert feeds["input_ids"][lo:hi].tolist() == s
        assert feeds["position_ids"][lo:hi].tolist() == list(range(len(s)))
    assert all(v.dtype == np.int32 for k, v in feeds.items() if k != "max_seqlen")
    assert not feeds["token_type_ids"].any()


def test_pack_takes_numpy_sequences_and_token_types(rng):
    lengths = rng.integers(1, 40, size=5)
    seqs = [rng.integers(0, 50, n) for n in lengths]
    types = [rng.integers(0, 2, n) for n in lengths]
    as_lists = pack([s.tolist() for s in seqs], [t.tolist() for t in types])
    as_arrays = pack(seqs, types)
    for name in ("input_ids", "token_type_ids", "position_ids", "cu_seqlens"):
        assert as_arrays[name].dtype == np.int32
        assert as_arrays[name].tolist() == as_lists[name].tolist()
    assert as_lists["token_type_ids"].tolist() == np.concatenate(types).tolist()
    check_batch(seqs, LIMITS, types)  # valid: no error


def test_plan_calls_respects_every_limit(rng):
    for _ in range(200):
        lengths = rng.integers(1, LIMITS.max_seq + 1, size=int(rng.integers(1, 30))).tolist()
        calls = plan_calls(lengths, LIMITS)
        assert calls[0][0] == 0 and calls[-1][1] == len(lengths)
        assert all(a[1] == b[0] for a, b in zip(calls, calls[1:]))  # in order, nothing skipped
        for start, end in calls:
            assert 1 <= end - start <= LIMITS.max_batch
            assert sum(lengths[start:end]) <= LIMITS.max_tokens
        # greedy: the next sequence would not have fit into the previous call
        for (start, end), _ in zip(calls, calls[1:]):
            assert end - start == LIMITS.max_batch or sum(lengths[start:end + 1]) > LIMITS.max_tokens


@pytest.mark.parametrize("batch,types,match", [
    ([], None, "empty batch"),
    ([[1, 2], []], None, "sequence 1 is empty"),
    ([[1] * 41], None, "41 tokens, over the engine's --max-seq 40"),
    ([[1, 50]], None, "token id 50, outside the vocabulary"),
    ([[1, -1]], None, "token id -1"),
    ([[1, 2]], [[0]], "1 entries for 2 tokens"),
    ([[1, 2]], [[0, 2]], "token_type_ids of sequence 0 leave"),
    ([[1, 2], [3]], [[0, 0]], "token_type_ids has 1 sequences for 2"),
    ([[1, 2], [3, 4.5]], None, "sequence 1 is not a list of integer token ids"),
    ([[1, 2], 3], None, "sequence 1 is not a list of integer token ids"),
    ([[1, [2]]], None, "sequence 0 is not a list of integer token ids"),
    ([np.array([1, 2]), np.array([[1, 2]])], None, "sequence 1 is not a list of integer token ids"),
    ([[1, 2]], [[0, 0.5]], "token_type_ids sequence 0 is not a list of integer token ids"),
    # the first sequence the engine cannot take is named, whatever its problem
    ([[1, 2], [1, 50], [1] * 41, []], None, "sequence 1 holds token id 50"),
    ([[1, 2], [1] * 41, [1, 50], []], None, "sequence 1 has 41 tokens"),
    ([[1, 2], [], [1] * 41, [1, 50]], None, "sequence 1 is empty"),
    ([[1, 2], [1, 3]], [[0, 0], [0, 5]], "token_type_ids of sequence 1 leave"),
    # sequence 2's token types do not match its length, but sequence 1 fails first
    ([[1, 2], [1, 3], [4]], [[0, 0], [0, 7], [0, 0]], "token_type_ids of sequence 1 leave"),
])
def test_check_batch_names_the_problem(batch, types, match):
    with pytest.raises(EetError, match=match):
        check_batch(batch, LIMITS, types)


def test_staging_alternates_slots_and_retires_calls():
    """Two staging slots in turn: taking a slot back waits for a call still in it (only if not collected) and
    makes its handle stale; waiting on a stale handle names the problem; drain waits for what is in flight."""
    from eet.runtime.engine import Staging

    st = Staging(FakeDevice(), lambda: {"x": np.zeros(2)})
    s0 = st.take()
    a = st.issue(s0, "stream 0", batch=1)
    s1 = st.take()
    b = st.issue(s1, "stream 1", batch=2)
    assert s0 is not s1 and (a.batch, b.batch) == (1, 2) and s0.event.recorded == ["stream 0"]
    assert st.wait(a, "step") is s0.host and a.done and s0.event.waits == 1
    assert st.take() is s0 and a.stale and s0.event.waits == 1  # a was collected: no second wait
    with pytest.raises(EetError, match="this step's results were overwritten: collect a step before"):
        st.wait(a, "step")
    c = st.issue(s0, "stream 0")
    assert st.take() is s1 and s1.event.waits == 1 and b.stale and not c.done  # b never collected: waited for
    st.drain()
    assert c.done and s0.event.waits == 2 and s1.event.waits == 1  # only c was still in flight


def fake_bert_engine(limits, shape_buckets=False, call_limits=None, graphs="off"):
    """A BertEngine whose CUDA and TensorRT are NumPy fakes that run at once: hidden [T, 2] = (token id, position)
    per token, first_token_states the first row of each sequence; ``log`` records engine runs and collects,
    ``shapes`` the input shapes of every run. ``call_limits``: its profile's maxima (default ``limits``, a plan
    without room for bucket fillers). ``graphs``: its ``cuda_graphs`` mode (patch eet.runtime.device.CudaGraph
    with a fake to use ``stream``)."""
    import types

    from eet.runtime.bert import BertEngine
    from eet.runtime.engine import Staging, TensorIO

    class Context:
        def __init__(self, engine):
            self.engine, self.stream, self.shapes = engine, types.SimpleNamespace(handle=7), {}

        def set_shapes(self, shapes):
            self.shapes = dict(shapes)

        def execute(self):
            buf, t, b = self.engine.buffers, self.shapes["input_ids"][0], self.shapes["cu_seqlens"][0] - 1
            ids, pos = buf["input_ids"].view(np.int32)[:t], buf["position_ids"].view(np.int32)[:t]
            hidden = np.stack([ids, pos], 1).astype(np.float32)
            buf["hidden_states"].view(np.float32)[: 2 * t] = hidden.reshape(-1)
            starts = buf["cu_seqlens"].view(np.int32)[:b]
            buf["first_token_states"].view(np.float32)[: 2 * b] = hidden[starts].reshape(-1)
            self.engine.log.append("run")
            self.engine.shapes.append(self.shapes)

    class Fake(BertEngine):
        def __init__(self):  # no plan, no GPU
            self._closed, self.device, self.limits, self.hidden_size = False, FakeDevice(), limits, 2
            self.call_limits = call = call_limits or limits
            self.io = {n: TensorIO(n, np.dtype(np.float32), False, 0) for n in ("hidden_states", "first_token_states")}
            self.buffers = {n: np.zeros(4 * 2 * (call.max_tokens + call.max_batch + 1), np.uint8)
                            for n in ("input_ids", "token_type_ids", "position_ids", "cu_seqlens", "max_seqlen",
                                      "hidden_states", "first_token_states")}
            self.contexts, self.log, self.shapes, self.shape_buckets = [Context(self)], [], [], shape_buckets
            self.graphs, self._graphs, self._warm = graphs, {}, set()
            self._staging = Staging(self.device, self._host_buffers)

        def collect_packed(self, call, copy=True):
            self.log.append("collect")
            return super().collect_packed(call, copy)

    return Fake()


@pytest.mark.parametrize("room", [False, True], ids=["plan-without-room", "plan-with-room"])
@pytest.mark.parametrize("buckets", [False, True])
def test_encode_pipelines_its_calls(rng, buckets, room):
    """The real submit_packed / collect_packed under encode(), over fakes: call i + 1 runs before call i is
    collected, every sequence gets its own token ids and positions back, in input order, over several calls; a
    call collected after two more were submitted fails. With shape buckets every call has the profile's largest
    sequence count, max_seq as its max_seqlen carrier and a bucketed token count, and the fillers' outputs are
    dropped; a plan with room for the fillers (as `eet build` makes them) is called as often as without buckets,
    one without loses a sequence slot per call."""
    limits = BertLimits(max_batch=3, max_tokens=14, max_seq=8, vocab_size=100)
    call = BertLimits(4, 14 + 3, 8, 100) if room else limits
    engine = fake_bert_engine(limits, shape_buckets=buckets, call_limits=call)
    seqs = [rng.integers(0, 100, n).tolist() for n in (3, 4, 2, 5, 1, 8, 7, 1, 1, 1)]
    out = engine.encode(seqs)
    lengths = [len(s) for s in seqs]
    n = len(plan_calls(lengths, bucket_limits(call) if buckets else limits))
    assert out.calls == n >= 3
    assert n == len(plan_calls(lengths, limits)) if room or not buckets else n > len(plan_calls(lengths, limits))
    if buckets:
        assert {s["input_ids"] for s in engine.shapes} <= {(8,), (16,), (call.max_tokens,)}  # bucket or the largest
        assert {(s["cu_seqlens"], s["max_seqlen"]) for s in engine.shapes} == {((call.max_batch + 1,), (8,))}
    else:
        assert sum(s["input_ids"][0] for s in engine.shapes) == sum(map(len, seqs))
    assert engine.log == ["run"] + ["run", "collect"] * (n - 1) + ["collect"]
    for row, seq in enumerate(seqs):
        assert out.hidden_states[row].tolist() == [[t, i] for i, t in enumerate(seq)]
        assert out.first_token[row].tolist() == [seq[0], 0]
    first = engine.submit_packed(pack(seqs[:1]))
    engine.submit_packed(pack(seqs[1:2]))
    engine.submit_packed(pack(seqs[2:3]))
    with pytest.raises(EetError, match="this call's results were overwritten"):
        engine.collect_packed(first)


def test_encode_output_choices(rng, monkeypatch):
    """encode(output=...): an unknown choice and output="torch" without PyTorch's CUDA are clear errors, raised
    before the engine runs; mean_pooled() of NumPy outputs is the float32 mean of each sequence."""
    import eet.runtime.bert as bert

    limits = BertLimits(max_batch=3, max_tokens=14, max_seq=8, vocab_size=100)
    engine = fake_bert_engine(limits)
    seqs = [rng.integers(0, 100, n).tolist() for n in (3, 1, 5)]
    with pytest.raises(EetError, match=r"output='cupy' is not one of 'numpy', 'torch'"):
        engine.encode(seqs, output="cupy")

    class NoCuda:
        __version__ = "9.9+cpu"

        class cuda:
            @staticmethod
            def is_available():
                return False

    monkeypatch.setitem(__import__("sys").modules, "torch", NoCuda)
    with pytest.raises(EetError, match=r"needs PyTorch with CUDA, and torch 9.9\+cpu sees no GPU .*output='numpy'"):
        engine.encode(seqs, output="torch")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # import torch fails
    with pytest.raises(EetError, match="needs PyTorch, which is not installed"):
        bert.torch_on(0)
    assert engine.log == []  # nothing ran
    out = engine.encode(seqs)
    expect = np.array([[np.mean(s), (len(s) - 1) / 2] for s in seqs], np.float32)
    np.testing.assert_allclose(out.mean_pooled(), expect, rtol=1e-6)


@pytest.mark.parametrize("rows", [1, 3, 37, 1500])
def test_copy_rows(rng, rows):
    """copy_rows: the threaded copy (1500 x 768 fp16 is 2.2 MB, over the one-thread limit) and the plain one give
    dst == src in every row, and touch nothing outside dst."""
    from eet.runtime.bert import copy_rows

    src = rng.standard_normal((rows, 768)).astype(np.float16)
    out = np.full((rows + 2, 768), np.nan, np.float16)
    copy_rows(out[1:-1], src)
    assert np.array_equal(out[1:-1], src) and np.isnan(out[[0, -1]]).all()


class FakeGraph:
    """Stands in for eet.runtime.device.CudaGraph: capture keeps the recording, each launch replays it."""
    made: list = []

    def __init__(self, stream_handle, record):
        self.stream, self.record, self.launches, self.closed = stream_handle, record, 0, False
        FakeGraph.made.append(self)

    def launch(self):
        self.launches += 1
        self.record()

    def close(self):
        self.closed = True


@pytest.mark.parametrize("graphs, buckets", [("stream", True), ("stream", False), ("off", True)])
def test_encode_graphs_per_shape(rng, monkeypatch, graphs, buckets):
    """With cuda_graphs "stream" and shape buckets, a shape's first call runs plainly, its second captures a CUDA
    graph (on the context's stream) and launches it, and every later call replays it, with each call's own
    results; a new bucket gets its own graph; warm-up leaves every bucket captured; close() frees the graphs.
    Without buckets, or with graphs off, nothing is captured."""
    import eet.runtime.device as device

    FakeGraph.made = []
    monkeypatch.setattr(device, "CudaGraph", FakeGraph)
    limits, call = BertLimits(3, 14, 8, 100), BertLimits(4, 17, 8, 100)
    engine = fake_bert_engine(limits, shape_buckets=buckets, call_limits=call, graphs=graphs)
    for i in range(4):
        seqs = [rng.integers(0, 100, n).tolist() for n in (3, 2)]  # 5 tokens: the 8-token bucket
        out = engine.encode(seqs)
        assert [h.tolist() for h in out.hidden_states] == [[[t, j] for j, t in enumerate(q)] for q in seqs]
        if graphs == "off" or not buckets:
            assert FakeGraph.made == []
        else:
            assert len(FakeGraph.made) == min(i, 1)  # none after the plain first call, then one
            if i:
                assert FakeGraph.made[0].stream == 7 and FakeGraph.made[0].launches == i
    if graphs == "off" or not buckets:
        return
    engine.encode([rng.integers(0, 100, 9).tolist()[:8], [1, 2, 3, 4, 5, 6]])  # 14 tokens: the 16-token bucket
    assert len(FakeGraph.made) == 1 and len(engine._warm) == 2  # run plainly once first
    engine._warm.clear(), engine._graphs.clear()
    FakeGraph.made, engine.runtime_cache = [], SavedCache()
    engine.warm_up()
    counts = bucket_token_counts(call)
    assert len(FakeGraph.made) == len(counts) and all(g.launches == 1 for g in FakeGraph.made)
    graphs_made = list(FakeGraph.made)
    engine._release()
    assert all(g.closed for g in graphs_made) and engine._graphs == {}


def test_token_buckets():
    assert [token_bucket(n, 16384, 512) for n in (1, 64, 65, 1000, 1100, 9120, 16000)] == [
        64, 64, 128, 1024, 1152, 9216, 16384]
    buckets = [token_bucket(n, 16384, 512) for n in range(1, 16385)]
    assert len(set(buckets)) == 56  # the shapes a BERT engine of --max-tokens 16384 meets, at most
    assert all(n <= b <= max(n * 9 / 8, 64 * -(-n // 64)) for n, b in zip(range(1, 16385), buckets))
    assert token_bucket(3000, 2048 + 1000, 100) == 3000 and token_bucket(2900, 5000, 100) == 2900
    assert bucket_limits(BertLimits(1, 100, 40, 50)) is None  # no slot for a filler
    assert bucket_limits(BertLimits(8, 45, 40, 50)) is None  # 7 tokens kept free leave less than --max-seq
    assert bucket_limits(BertLimits(8, 47, 40, 50)) == BertLimits(7, 40, 40, 50)


def test_fill_to_bucket_keeps_the_real_sequences_first(rng):
    for _ in range(200):
        limits = BertLimits(int(rng.integers(2, 12)), int(rng.integers(300, 3000)), int(rng.integers(1, 300)), 50)
        small = bucket_limits(limits)
        if small is None:
            continue
        lengths = rng.integers(1, limits.max_seq + 1, int(rng.integers(1, 40))).tolist()
        start, end = plan_calls(lengths, small)[0]
        seqs = [rng.integers(0, 50, n).tolist() for n in lengths[start:end]]
        feeds, filled = pack(seqs), fill_to_bucket(pack(seqs), limits)
        t, b = feeds["input_ids"].size, len(seqs)
        assert filled["input_ids"].size == token_bucket(t + limits.max_batch - b, limits.max_tokens, limits.max_seq)
        assert filled["cu_seqlens"].size == limits.max_batch + 1 and filled["max_seqlen"] == limits.max_seq
        for name in ("input_ids", "token_type_ids", "position_ids"):
            assert filled[name].dtype == np.int32 and (filled[name][:t] == feeds[name]).all()
        assert (filled["cu_seqlens"][: b + 1] == feeds["cu_seqlens"]).all()
        fill = np.diff(filled["cu_seqlens"][b:])
        assert fill.min() >= 1 and fill.max() <= limits.max_seq and filled["cu_seqlens"][-1] == filled["input_ids"].size
        assert (filled["position_ids"][t:] == np.concatenate([np.arange(n) for n in fill])).all()
    with pytest.raises(EetError, match="does not fit a bucket"):
        fill_to_bucket(pack([[1]] * 4), LIMITS)  # max_batch sequences leave no filler slot


def test_bucket_token_counts():
    """Every token count fill_to_bucket() can give, and only those: one token per sequence up to the profile's
    maxima (or max_batch x max_seq)."""
    assert bucket_token_counts(BertLimits(4, 17, 8, 100)) == [8, 16, 17]
    assert bucket_token_counts(BertLimits(3, 100, 8, 100)) == [8, 16, 24]  # 3 x 8 tokens at most
    room = BertLimits(33, 16448, 512, 100)  # `eet build bert --max-batch 32 --max-tokens 16384 --max-seq 512`
    counts = bucket_token_counts(room)
    assert counts[0] == 64 and counts[-1] == 16448 and len(counts) == 57 and counts == sorted(set(counts))
    small = bucket_limits(room)
    rng = np.random.default_rng(0)
    for _ in range(100):
        lengths = rng.integers(1, room.max_seq + 1, int(rng.integers(1, small.max_batch + 1))).tolist()
        start, end = plan_calls(lengths, small)[0]
        filled = fill_to_bucket(pack([[0] * n for n in lengths[start:end]]), room)
        assert filled["input_ids"].size in counts


def test_bert_warm_up_runs_every_bucket_once(rng):
    """warm_up() makes one packed call per bucket_token_counts() value (the profile's sequence count, max_seq as
    the max_seqlen carrier), saves the runtime cache, and encode() after it meets none but those shapes. A profile
    too small for a filler (one sequence), or an engine loaded without buckets, refuses."""
    limits = BertLimits(max_batch=3, max_tokens=30, max_seq=8, vocab_size=100)
    room = BertLimits(4, 36, 8, 100)
    engine = fake_bert_engine(limits, shape_buckets=True, call_limits=room)
    engine.runtime_cache = SavedCache()
    done = engine.warm_up()
    counts = bucket_token_counts(room)
    assert [(s.profile, s.shape) for s in done] == [("packed", (t, 4)) for t in counts]
    assert engine.runtime_cache.saves == 1 and counts == [8, 16, 24, 32]
    warmed = [(s["input_ids"], s["cu_seqlens"], s["max_seqlen"]) for s in engine.shapes]
    assert warmed == [((t,), (5,), (8,)) for t in counts]
    for _ in range(20):
        engine.encode([rng.integers(0, 100, int(n)).tolist() for n in rng.integers(1, 9, int(rng.integers(1, 12)))])
    assert {(s["input_ids"], s["cu_seqlens"], s["max_seqlen"]) for s in engine.shapes} == set(warmed)
    one = BertLimits(1, 30, 8, 100)  # a profile of one sequence: no slot for a filler
    with pytest.raises(EetError, match="no room for bucket fillers"):
        fake_bert_engine(one, shape_buckets=True).warm_up()
    with pytest.raises(EetError, match="shape_buckets=False"):
        fake_bert_engine(limits, shape_buckets=False, call_limits=room).warm_up()


def counting_step(vocab=10):
    """A step function whose row r emits (r + step) % vocab: predictable EOS timing per row."""
    calls = []

    def step(ids, pads, position, extra):
        calls.append((ids.shape, position))
        rows = np.arange(ids.shape[0])
        return ((rows + position) % vocab).astype(np.int32), None

    return step, calls


def test_eos_stops_rows_and_the_loop():
    from eet.runtime.generation import generate, iterate

    step, calls = counting_step()
    prompts = [[1, 2, 3], [4], [5, 6]]
    # the context step (position 0) makes row r emit r, then decode steps at positions 3, 4, ... emit r + position
    tokens, _ = generate(step, prompts, 10, eos_token_id=6)
    assert tokens == [[0, 3, 4, 5, 6], [1, 4, 5, 6], [2, 5, 6]]
    assert [c[1] for c in calls] == [0, 3, 4, 5, 6]  # stopped once every row finished, not after 10 tokens
    assert calls[0][0] == (3, 3) and all(shape == (3, 1) for shape, _ in calls[1:])
    streamed = list(iterate(counting_step()[0], prompts, 10, eos_token_id=6))
    assert [s.tokens.tolist() for s in streamed] == [[0, 1, 2], [3, 4, 5], [4, 5, 6], [5, 6, -1], [6, -1, -1]]
    assert [s.finished.tolist() for s in streamed] == [[False] * 3, [False] * 3, [False, False, True],
                                                      [False, True, True], [True] * 3]
    tokens, _ = generate(counting_step()[0], prompts, 3, eos_token_id=None)
    assert tokens == [[0, 3, 4], [1, 4, 5], [2, 5, 6]]


def sidecar_info(**over):
    from eet.plugins.spec import PREPAD_ATTENTION

    info = {"family": "gpt2", "tensorrt": {"flavour": "tensorrt_rtx", "version": "1.7.1.116"},
            "plugins": [{"name": PREPAD_ATTENTION.name, "version": PREPAD_ATTENTION.version, "namespace": "eet"}]}
    info.update(over)
    return info


def test_compatibility_errors():
    check_compatible(sidecar_info(), "tensorrt_rtx", "1.7.1.116")
    with pytest.raises(EetError, match="a plan runs only on the TensorRT flavour that built it"):
        check_compatible(sidecar_info(), "tensorrt", "10.13.0")
    with pytest.raises(EetError, match="plans are tied to the TensorRT version"):
        check_compatible(sidecar_info(), "tensorrt_rtx", "1.8.0")
    # version 2 takes one fused qkv input: a plan built with version 1 (query, key, value) is refused
    with pytest.raises(EetError, match="EetPrePadAttention version 1 .*provides version 2.*rebuild"):
        check_compatible(sidecar_info(plugins=[{"name": "EetPrePadAttention", "version": "1", "namespace": "eet"}]),
                         "tensorrt_rtx", "1.7.1.116")
    # EetVarlenAttention version 2 likewise (BERT plans built before the fused projection)
    bert = dict(family="bert", plugins=[{"name": "EetVarlenAttention", "version": "1", "namespace": "eet"}])
    with pytest.raises(EetError, match="EetVarlenAttention version 1 .*provides version 2.*rebuild"):
        check_compatible(sidecar_info(**bert), "tensorrt_rtx", "1.7.1.116")
    with pytest.raises(EetError, match="EetPrePadAttention version 9"):
        check_compatible(sidecar_info(plugins=[{"name": "EetPrePadAttention", "version": "9", "namespace": "eet"}]),
                         "tensorrt_rtx", "1.7.1.116")
    with pytest.raises(EetError, match="does not provide"):
        check_compatible(sidecar_info(plugins=[{"name": "Other", "version": "1"}]), "tensorrt_rtx", "1.7.1.116")
    with pytest.raises(EetError, match="unknown model family"):
        check_compatible(sidecar_info(family="t5"), "tensorrt_rtx", "1.7.1.116")


def test_unsupported_gpu_message_names_gpu_and_capability():
    from eet.runtime.device import GpuInfo

    msg = unsupported_gpu_message(GpuInfo(0, "NVIDIA H100 80GB HBM3", (9, 0)), "tensorrt_rtx", "1.7.1.116",
                                  ["Target GPU SM 90 is not supported by this TensorRT release."])
    assert "NVIDIA H100 80GB HBM3, compute capability 9.0" in msg and "tensorrt_rtx 1.7.1.116" in msg
    assert "SM 90 is not supported" in msg and "full TensorRT" in msg


def test_load_without_pycuda_or_gpu_says_what_is_missing(sidecar_only_gpt2, monkeypatch):
    import builtins

    import eet.runtime

    folder = sidecar_only_gpt2
    real_import = builtins.__import__

    def no_pycuda(name, *args, **kwargs):
        if name.startswith("pycuda"):
            raise ImportError("No module named 'pycuda'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pycuda)
    monkeypatch.setattr("eet.plugins._lib.load_library", lambda: None)  # CI machines build no kernels for here
    with pytest.raises(EetError, match=r"needs PyCUDA.*pip install 'eet-trt\[runtime\]'"):
        eet.runtime.load(folder)


def test_load_checks_the_sidecar_first(tmp_path, sidecar_only_gpt2):
    import eet.runtime

    with pytest.raises(EetError, match="has no engine.json"):
        eet.runtime.load(tmp_path / "nothing")
    folder = sidecar_only_gpt2
    (folder / "engine.plan").write_bytes(b"other")
    with pytest.raises(EetError, match="does not match its sidecar"):
        eet.runtime.load(folder)
    info = json.loads((folder / "engine.json").read_text())
    info["schema"] = "eet-trt/engine/0"
    (folder / "engine.json").write_text(json.dumps(info))
    with pytest.raises(EetError, match="schema"):
        eet.runtime.load(folder)


def test_load_refuses_a_version_1_prepad_plan(sidecar_only_gpt2):
    """A plan built with EetPrePadAttention version 1 (separate query, key, value inputs) fails before
    deserialization with the version mismatch, not inside TensorRT."""
    import eet.runtime

    folder = sidecar_only_gpt2
    info = json.loads((folder / "engine.json").read_text())
    info["plugins"] = [{"name": "EetPrePadAttention", "version": "1", "namespace": "eet"}]
    (folder / "engine.json").write_text(json.dumps(info))
    with pytest.raises(EetError, match=r"EetPrePadAttention version 1 .*this EET provides version 2.*rebuild"):
        eet.runtime.load(folder)


def test_sampling_arguments_are_checked():
    from eet.runtime.generation import Sampling

    for bad, match in ((dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0), "top_p"),
                       (dict(top_p=1.5), "top_p")):
        with pytest.raises(EetError, match=match):
            Sampling(**bad)


class FakeRuntimeCache:
    """TensorRT-RTX's IRuntimeCache: accepts blobs that start with b"kernels", serializes what it holds."""

    def __init__(self):
        self.blob, self.resets = b"", 0

    def deserialize(self, blob):
        if not blob.startswith(b"kernels"):
            return False
        self.blob = bytes(blob)
        return True

    def serialize(self):
        return memoryview(self.blob)

    def reset(self):
        self.blob, self.resets = b"", self.resets + 1
        return True


class FakeRuntimeConfig:
    made: list = []

    def create_runtime_cache(self):
        FakeRuntimeConfig.made.append(FakeRuntimeCache())
        return FakeRuntimeConfig.made[-1]

    def set_runtime_cache(self, cache):
        self.cache = cache


def attached(path, contexts=2):
    """A RuntimeCache on ``path`` given to ``contexts`` fake runtime configs (as Engine does per profile)."""
    from eet.runtime.engine import RuntimeCache

    FakeRuntimeConfig.made = []
    cache, configs = RuntimeCache(path), [FakeRuntimeConfig() for _ in range(contexts)]
    for config in configs:
        cache.attach(config)
    return cache, configs


def test_runtime_cache_is_shared_saved_and_read_back(tmp_path):
    from eet.runtime.engine import default_runtime_cache_path

    path = default_runtime_cache_path(tmp_path, "ab" * 32, (9, 0))
    assert path == tmp_path / "runtime_cache" / ("ab" * 8 + "-sm90.bin")
    cache, configs = attached(path)
    assert len(FakeRuntimeConfig.made) == 1 and all(c.cache is cache.cache for c in configs)
    assert not cache.save() and not path.exists()  # nothing compiled yet: no file
    cache.cache.blob = b"kernels: 3 shapes"  # what TensorRT-RTX compiled while the contexts ran
    assert cache.save() and path.read_bytes() == b"kernels: 3 shapes"
    assert list(path.parent.iterdir()) == [path]  # the temporary file was renamed over it
    assert not cache.save()  # unchanged: not written again

    again, configs = attached(path)  # the next process
    assert again.cache.blob == b"kernels: 3 shapes" and configs[1].cache is again.cache
    assert not again.save()
    again.cache.blob += b", 1 more"
    assert again.save() and path.read_bytes() == b"kernels: 3 shapes, 1 more"


def test_runtime_cache_replaces_a_file_tensorrt_rejects(tmp_path):
    path = tmp_path / "cache.bin"
    path.write_bytes(b"\x00damaged")
    with pytest.warns(UserWarning, match=r"did not accept the runtime cache .*cache\.bin.*compile again"):
        cache, _ = attached(path)
    assert cache.cache.resets == 1 and cache.cache.blob == b""
    cache.cache.blob = b"kernels: new"
    assert cache.save() and path.read_bytes() == b"kernels: new"


def test_runtime_cache_that_cannot_be_written_only_warns(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    cache, _ = attached(blocker / "cache.bin")  # its folder is a file: mkdir fails
    cache.cache.blob = b"kernels"
    with pytest.warns(UserWarning, match=r"could not save the runtime cache to .*a-file/cache\.bin.*runtime_cache="):
        assert not cache.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_runtime_cache_in_memory_or_absent(tmp_path):
    from eet.runtime.engine import RuntimeCache

    cache, configs = attached(None)  # runtime_cache=None: shared, never written
    cache.cache.blob = b"kernels"
    assert configs[0].cache is cache.cache and not cache.save()
    full_tensorrt = RuntimeCache(tmp_path / "cache.bin")
    full_tensorrt.attach(object())  # a runtime config without runtime caches (full TensorRT): left alone
    assert full_tensorrt.cache is None and not full_tensorrt.save() and not list(tmp_path.iterdir())
