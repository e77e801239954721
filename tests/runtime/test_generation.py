"""Generation control that needs no GPU: left padding, limits and their errors, the pipelined loop, and the GPT-2
engine's submit/collect wiring over NumPy fakes of its CUDA side."""
import numpy as np
import pytest

from eet.errors import EetError
from eet.runtime.generation import Limits, batch_bucket, bucket_shapes, greedy, left_pad, prompt_width
from fakes import FakeDevice, SavedCache

LIMITS = Limits(max_batch=4, max_prompt=8, max_len=16, vocab_size=100)


def test_left_pad():
    ids, pads = left_pad([[5, 6, 7], [9], [1, 2]])
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9], [0, 1, 2]] and pads.tolist() == [0, 2, 1]
    assert ids.dtype == np.int32 and pads.dtype == np.int32
    ids, pads = left_pad([[5, 6, 7], [9]], width=5)
    assert ids.tolist() == [[0, 0, 5, 6, 7], [0, 0, 0, 0, 9]] and pads.tolist() == [2, 4]
    with pytest.raises(EetError, match="width of 2 is below the longest prompt"):
        left_pad([[5, 6, 7]], width=2)


def test_prompt_width_is_a_multiple_of_64_within_the_limits():
    big = Limits(max_batch=32, max_prompt=512, max_len=1024, vocab_size=100)
    assert [prompt_width(n, 128, big) for n in (1, 64, 65, 497, 512)] == [64, 64, 128, 512, 512]
    assert prompt_width(497, 520, big) == 504  # 512 would leave no room for 520 new tokens in 1024
    assert prompt_width(500, 524, big) == 500  # never below the longest prompt
    assert prompt_width(3, 5, LIMITS) == 8  # --max-prompt 8
    assert prompt_width(3, 10, LIMITS) == 6  # --max-len 16


def test_batch_bucket_is_the_next_power_of_two_within_max_batch():
    big = Limits(max_batch=32, max_prompt=512, max_len=1024, vocab_size=100)
    assert sorted({batch_bucket(n, big) for n in range(1, 33)}) == [1, 2, 4, 8, 16, 32]
    assert [batch_bucket(n, big) for n in (1, 2, 3, 5, 16, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    odd = Limits(max_batch=24, max_prompt=8, max_len=16, vocab_size=100)
    assert [batch_bucket(n, odd) for n in (9, 16, 17, 24)] == [16, 16, 24, 24]
    assert all(n <= batch_bucket(n, big) < 2 * n for n in range(1, 33))


def test_bucket_shapes_cover_every_bucketed_request(rng):
    """bucket_shapes() lists the (rows, width) of every context phase that a request with room for
    max_new_tokens (<= --max-len - --max-prompt) runs at with buckets, and nothing else; a request without that
    room may run at a width of its own."""
    big = Limits(max_batch=32, max_prompt=512, max_len=1024, vocab_size=100)
    shapes = bucket_shapes(big)
    assert shapes == [(r, w) for r in (1, 2, 4, 8, 16, 32) for w in range(64, 513, 64)]
    odd = Limits(max_batch=5, max_prompt=100, max_len=130, vocab_size=100)
    assert bucket_shapes(odd) == [(r, w) for r in (1, 2, 4, 5) for w in (64, 100)]
    for limits in (big, odd, LIMITS):
        listed, met = set(bucket_shapes(limits)), set()
        for _ in range(300):
            n, longest = int(rng.integers(1, limits.max_batch + 1)), int(rng.integers(1, limits.max_prompt + 1))
            new = int(rng.integers(1, limits.max_len - limits.max_prompt + 1))
            met.add((batch_bucket(n, limits), prompt_width(longest, new, limits)))
        assert met <= listed
    assert (1, 80) not in bucket_shapes(odd) and prompt_width(70, 50, odd) == 80  # 70 + 50: no room for 100


def test_filler_rows_change_nothing_for_the_prompts():
    """iterate(rows=R) runs R rows: the prompts' rows first, left-padded as before, then one-token filler rows
    (token 0, pad width - 1). The prompts' tokens, logits and sampling draws are those of the run without
    fillers; a filler that produces EOS does not count, and the loop still stops when every prompt is done."""
    from eet.runtime.generation import Sampling, iterate

    seen = []

    def step(ids, pads, position, extra):  # row r emits (last input + 1 + r) % 100; logits mark the row
        seen.append((ids.copy(), pads.copy(), position, extra["uniform"].copy()))
        rows = np.arange(ids.shape[0])
        return ((ids[:, -1] + 1 + rows) % 100).astype(np.int32), np.repeat(rows[:, None], 100, 1).astype(np.float32)

    sampling = Sampling(temperature=1.0, seed=3)
    prompts = [[5, 6, 7], [9]]
    plain = list(iterate(step, prompts, 4, LIMITS, sampling=sampling, width=4))
    plain_seen, seen[:] = list(seen), []
    filled = list(iterate(step, prompts, 4, LIMITS, sampling=sampling, width=4, rows=4))
    assert [s.tokens.tolist() for s in filled] == [s.tokens.tolist() for s in plain]
    assert all(s.logits.shape == (2, 100) and s.finished.shape == (2,) for s in filled)
    assert seen[0][0].tolist() == [[0, 5, 6, 7], [0, 0, 0, 9], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert seen[0][1].tolist() == [1, 3, 3, 3] and [x[0].shape for x in seen[1:]] == [(4, 1)] * 3
    for (_, _, pos, u), (_, _, plain_pos, plain_u) in zip(seen, plain_seen):
        assert pos == plain_pos and u.shape == (4,)
        np.testing.assert_array_equal(u[:2], plain_u)
    # EOS 4: prompt row 1 emits it at once, row 0 at the third step; filler row 3 emits it at once and row 2
    # never: the loop stops after the third step all the same
    stops = list(iterate(step, [[1], [2]], 8, LIMITS, eos_token_id=4, width=1, rows=4))
    assert [s.tokens.tolist() for s in stops] == [[2, 4], [3, -1], [4, -1]]
    assert stops[-1].finished.tolist() == [True, True]


@pytest.mark.parametrize("prompts,new,message", [
    ([], 4, "no prompts"),
    ([[1]] * 5, 4, "5 prompts exceed the engine's --max-batch 4"),
    ([[1], []], 4, "prompt 1 is empty"),
    ([[1] * 9], 4, "prompt 0 has 9 tokens, over the engine's --max-prompt 8"),
    ([[1, 100]], 4, "token id 100, outside the vocabulary"),
    ([[1, -1]], 4, "token id -1, outside the vocabulary"),
    ([[1] * 8], 9, "8 tokens\\) \\+ 9 new tokens = 17 exceeds the engine's --max-len 16"),
    ([[1]], 0, "max_new_tokens must be >= 1"),
    ([[1], [2, 3.7]], 4, "prompt 1 is not a list of integer token ids"),
    ([[1], ["a"]], 4, "prompt 1 is not a list of integer token ids"),
    ([[1], 5], 4, "prompt 1 is not a list of integer token ids"),
    ([[1], [1] * 9, [1, 100]], 4, "prompt 1 has 9 tokens"),  # the first prompt that fails is named
    ([[1], [1, 100], [1] * 9], 4, "prompt 1 holds token id 100"),
])
def test_limits(prompts, new, message):
    with pytest.raises(EetError, match=message):
        LIMITS.check(prompts, new)


def test_greedy_drives_context_then_decode():
    """A fake step function records what the loop feeds it: one context step, then S = 1 steps."""
    calls = []

    def step(ids, pads, position, extra):
        calls.append((ids.copy(), pads.copy(), position))
        token = (ids[:, -1] + 1).astype(np.int32)
        return token, np.zeros((ids.shape[0], 100), np.float32)

    tokens, logits = greedy(step, [[5, 6], [9]], 3, LIMITS, eos_token_id=11)
    assert [c[2] for c in calls] == [0, 2, 3]
    assert calls[0][0].tolist() == [[5, 6], [0, 9]] and calls[1][0].shape == (2, 1)
    assert tokens == [[7, 8, 9], [10, 11]] and len(logits) == 3


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
])
def test_bad_sampling(kwargs, message):
    from eet.runtime.generation import Sampling

    with pytest.raises(EetError, match=message):
        Sampling(**kwargs)


class FakePipelined:
    """A :class:`~eet.runtime.generation.Pipelined` fake: row r emits its last input token + 1; ``ids`` None feeds
    back the tokens of the step submitted last (as the engine does on the GPU). Records submits and collects."""

    def __init__(self):
        self.log, self.uniforms, self.device_tokens = [], {}, None

    def submit(self, ids, pads, step, extra):
        if ids is None:
            ids = self.device_tokens.reshape(-1, 1)
        self.device_tokens = (ids[:, -1] + 1).astype(np.int32)
        self.uniforms[step] = extra["uniform"].copy()
        self.log.append(("submit", step))
        return step, self.device_tokens

    def collect(self, handle):
        self.log.append(("collect", handle[0]))
        return handle[1], None

    def drain(self):
        self.log.append(("drain",))


def test_pipelined_step_is_submitted_before_the_previous_is_read():
    """iterate() keeps one decode step in flight ahead of the step it reads, feeds tokens back through
    submit(None, ...), drains at the end, and yields what the plain loop yields with the same sampling draws."""
    from eet.runtime.generation import Sampling, iterate

    sampling = Sampling(temperature=1.0, seed=7)
    fake = FakePipelined()
    got = [s.tokens.tolist() for s in iterate(fake, [[5, 6], [9]], 3, LIMITS, sampling=sampling)]
    assert got == [[7, 10], [8, 11], [9, 12]]
    assert fake.log == [("submit", 0), ("submit", 2), ("collect", 0), ("submit", 3), ("collect", 2),
                        ("collect", 3), ("drain",)]
    plain_uniforms = {}

    def step(ids, pads, position, extra):
        plain_uniforms[position] = extra["uniform"].copy()
        return (ids[:, -1] + 1).astype(np.int32), None

    assert [s.tokens.tolist() for s in iterate(step, [[5, 6], [9]], 3, LIMITS, sampling=sampling)] == got
    assert sorted(plain_uniforms) == sorted(fake.uniforms) == [0, 2, 3]
    for position, u in plain_uniforms.items():
        np.testing.assert_array_equal(u, fake.uniforms[position])


def test_pipelined_early_stop_drains_the_step_ahead():
    from eet.runtime.generation import iterate

    fake = FakePipelined()  # both rows emit 7, 8, 9, ...: EOS 8 finishes them at the second token
    got = [s.tokens.tolist() for s in iterate(fake, [[5, 6], [6]], 10, LIMITS, eos_token_id=8)]
    assert got == [[7, 7], [8, 8]]
    assert fake.log == [("submit", 0), ("submit", 2), ("collect", 0), ("submit", 3), ("collect", 2), ("drain",)]
    fake = FakePipelined()  # a consumer that stops reading: closing the generator drains too
    stream = iterate(fake, [[5, 6], [6]], 10, LIMITS)
    next(stream)
    stream.close()
    assert fake.log[-1] == ("drain",) and fake.log.count(("submit", 3)) == 0


def test_feedback_needs_a_previous_step():
    from eet.runtime.generation import Deferred

    with pytest.raises(EetError, match="needs a previous step"):
        Deferred(lambda *a: None).collect((None, np.zeros(1, np.int32), 3, {}))


def fake_gpt2_engine(max_batch=4, max_prompt=8, vocab=100):
    """A Gpt2Engine whose CUDA and TensorRT are NumPy fakes that run each copy and step at once: a step's
    ``next_token`` is (last input token + step) % vocab. Exercises submit/collect/drain's wiring (staging slots,
    the device-side token feedback, the stream order between the profiles) without a GPU; ``log`` records
    stream waits and steps."""
    from eet.runtime.engine import Staging, TensorIO
    from eet.runtime.gpt2 import Gpt2Engine

    log = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_for_event(self, event):
            log.append(("wait", self.name))

    class Context:
        def __init__(self, engine, name):
            self.engine, self.stream, self.shapes = engine, Stream(name), {}

        def set_shapes(self, shapes):
            self.shapes = dict(shapes)

        def execute(self):
            b, s = self.shapes["input_ids"]
            self.engine.met.add((self.stream.name, (b, s)))
            buf = self.engine.buffers
            ids = buf["input_ids"].view(np.int32)[: b * s].reshape(b, s)
            step = int(buf["step"].view(np.int32)[0])
            buf["next_token"].view(np.int32)[:b] = (ids[:, -1] + step) % vocab
            log.append(("step", self.stream.name, step))

    class Fake(Gpt2Engine):
        def __init__(self):  # no plan, no GPU
            self._closed, self.device, self.graphs, self.want_logits = False, FakeDevice(), "off", False
            self.limits = Limits(max_batch, max_prompt, 32, vocab)
            self.cache_names, self.cache_geometry, self.sampling_inputs = [], (), []
            self.buffers = {name: np.zeros(4 * max_batch * max_prompt, np.uint8)
                            for name in ("input_ids", "pad_lengths", "step", "next_token")}
            self.contexts = [Context(self, "context"), Context(self, "decode")]
            self.io = {"logits": TensorIO("logits", np.dtype(np.float32), False, 0)}
            self._staging = Staging(self.device, self._host_buffers)
            self._last = None
            self.log, self.met, self.shape_buckets = log, set(), False
            self.runtime_cache = SavedCache()

    return Fake()


def test_engine_pipeline_wiring_matches_the_plain_loop():
    """Gpt2Engine.submit/collect driven by iterate() (tokens fed back device to device) yields what the same
    steps give when each runs to completion with host token ids; the decode stream waits once for the context's."""
    from eet.runtime.generation import iterate

    prompts = [[5, 6, 7], [9], [1, 2]]
    engine = fake_gpt2_engine()
    piped = [s.tokens.tolist() for s in iterate(engine, prompts, 5, LIMITS)]
    assert [e for e in engine.log if e[0] == "wait"] == [("wait", "decode")]
    assert [e[1:] for e in engine.log if e[0] == "step"] == [("context", 0), ("decode", 3), ("decode", 4),
                                                             ("decode", 5), ("decode", 6)]
    plain_engine = fake_gpt2_engine()
    plain = [s.tokens.tolist() for s in iterate(lambda *a: plain_engine(*a), prompts, 5, LIMITS)]
    assert piped == plain == [[7, 9, 2], [10, 12, 5], [14, 16, 9], [19, 21, 14], [25, 27, 20]]
    with pytest.raises(EetError, match="needs a previous step"):
        fake_gpt2_engine().submit(None, np.zeros(1, np.int32), 3)


@pytest.mark.parametrize("buckets", [False, True])
def test_engine_stream_pads_prompts_to_a_bucket(buckets):
    """Gpt2Engine.stream() left-pads the prompt batch to prompt_width() with shape buckets (the context step's
    shape and the first decode position follow it), to the longest prompt without."""
    engine = fake_gpt2_engine()
    engine.shape_buckets = buckets
    out = [s.tokens.tolist() for s in engine.stream([[5, 6, 7], [9]], 3, eos_token_id=None)]
    width = prompt_width(3, 3, engine.limits) if buckets else 3
    assert width == (min(64, engine.limits.max_prompt) if buckets else 3)
    assert [e[1:] for e in engine.log if e[0] == "step"] == [("context", 0), ("decode", width),
                                                             ("decode", width + 1)]
    assert engine.contexts[0].shapes["input_ids"] == (2, width) and len(out) == 3


@pytest.mark.parametrize("buckets", [False, True])
def test_engine_stream_fills_the_batch_to_a_bucket(buckets):
    """With shape buckets, 3 prompts on a --max-batch 4 engine run as 4 rows (context and decode shapes) and
    yield 3 tokens per step, the same as the 3-row run without buckets."""
    engine = fake_gpt2_engine()
    engine.shape_buckets = buckets
    out = [s.tokens.tolist() for s in engine.stream([[5, 6, 7], [9], [4, 4]], 3, eos_token_id=None)]
    rows = 4 if buckets else 3
    assert engine.contexts[0].shapes["input_ids"][0] == rows and engine.contexts[1].shapes["input_ids"] == (rows, 1)
    w = prompt_width(3, 3, engine.limits) if buckets else 3  # the fake emits (last token + position) % 100
    assert out == [[t % 100 for t in (7 + d, 9 + d, 4 + d)] for d in (0, w, 2 * w + 1)]


def test_engine_warm_up_runs_every_bucket_once(rng):
    """warm_up() runs the context phase at every (rows, width) of bucket_shapes() and three decode steps per
    batch bucket (plain, graph capture, replay), saves the runtime cache, and leaves requests within the buckets
    no new shape; without shape buckets it refuses."""
    engine = fake_gpt2_engine(max_batch=4, max_prompt=8)
    with pytest.raises(EetError, match="shape_buckets=False"):
        engine.warm_up()
    engine.shape_buckets = True
    progress = []
    done = engine.warm_up(on_shape=progress.append)
    assert [(s.profile, s.shape) for s in done] == [
        ("context", (1, 8)), ("decode", (1, 1)), ("context", (2, 8)), ("decode", (2, 1)), ("context", (4, 8)),
        ("decode", (4, 1))]
    assert progress == done and all(s.seconds >= 0 for s in done) and engine.runtime_cache.saves == 1
    steps = [e[1:] for e in engine.log if e[0] == "step"]
    assert steps == [("context", 0), ("decode", 1), ("decode", 2), ("decode", 3)] * 3
    warmed = set(engine.met)
    assert warmed == {("context", (r, 8)) for r in (1, 2, 4)} | {("decode", (r, 1)) for r in (1, 2, 4)}
    for _ in range(20):
        prompts = [rng.integers(0, 100, int(rng.integers(1, 9))).tolist() for _ in range(rng.integers(1, 5))]
        list(engine.stream(prompts, int(rng.integers(1, engine.limits.max_len - 8 + 1)), eos_token_id=None))
    assert engine.met == warmed
