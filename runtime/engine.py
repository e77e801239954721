"""Load a built engine directory and run it: :func:`load` returns a :class:`~eet.runtime.bert.BertEngine`
(``encode()``) or a :class:`~eet.runtime.gpt2.Gpt2Engine` (``generate()``), both context managers.

    import eet.runtime
    with eet.runtime.load("eet-bert") as engine:
        out = engine.encode(["a sentence", "another one"])

What :func:`load` does, in order (each step fails with an :class:`EetError` that names the problem and the fix):

1. reads ``engine.json`` and checks its schema and the plan's sha256 (:mod:`eet.runtime.sidecar`);
2. checks that the installed TensorRT is the flavour and version the plan was built with, and that the plan's
   plugins are the versions this EET provides (:func:`check_compatible`);
3. opens the GPU's primary CUDA context with PyCUDA (so it coexists with PyTorch in one process), registers
   the EET plugin creators and deserializes the plan; a GPU the flavour cannot run the plan on is named in the
   error with its compute capability;
4. creates one execution context per optimization profile, each with its own stream, and device buffers for
   every engine input and output sized for the largest shapes of the profiles (the GPT-2 KV cache included:
   the runtime owns it). Host staging buffers are pinned;
5. with TensorRT-RTX, gives every context one runtime cache of the kernels it compiles per new shape, read from
   a file (by default under ``DIR/runtime_cache/``) and written back when the engine closes, so that the next
   process skips those compilations (:class:`RuntimeCache`; a missing, stale or unwritable file only warns);
6. with ``warm_up=True``, runs every shape bucket once (:meth:`Engine.warm_up`; ``eet warm DIR`` does it once
   and keeps the result in the runtime cache file).

``deserialize_hook`` is a seam for tests and benchmarks: a context-manager factory wrapped around the plan's
deserialization (the GPU tests pass the cc-shim's ``faked_capability`` there). The product passes nothing.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Mapping, Sequence

import numpy as np

from eet.errors import EetError

GRAPH_MODES = ("auto", "engine", "stream", "off")
"""How engine calls are captured in CUDA graphs (the GPT-2 decode step; BERT's calls, one graph per shape bucket):
``engine`` (TensorRT-RTX's own whole-graph capture, ``IRuntimeConfig.cuda_graph_strategy``), ``stream`` (the
runtime captures ``execute_async_v3`` with the CUDA driver's stream capture and replays it), ``off``, or
``auto``: for GPT-2 ``engine`` where the flavour has it, else ``stream``; for BERT ``stream`` (TensorRT-RTX's
capture was slower than none there: BERT's calls change shape from call to call)."""

SPECIALIZATION_MODES = ("auto", "lazy", "eager", "none")
"""TensorRT-RTX compiles shape-specialized kernels when a context meets a new shape
(``IRuntimeConfig.dynamic_shapes_kernel_specialization_strategy``): ``lazy`` keeps running the generic kernels
while it compiles in the background, ``eager`` compiles before the first run of a shape (0.3-0.7 s per shape
on an H100), ``none`` never specializes. ``auto`` is ``eager`` for every profile, so a shape always runs the
same kernels. With ``lazy`` (generic kernels first, specialized ones once compiled), repeating one generate()
on an fp32 GPT-2 test engine (whose GEMMs TensorRT-RTX runs in TF32) gave other greedy tokens at near-ties in
both of two test runs on an H100; with ``eager``, in none. The decode profile's CUDA graph also captures the
specialized kernels. Shape buckets keep the shapes few and the runtime cache keeps their kernels across
processes (:func:`load`). Ignored by flavours without it (full TensorRT picks its kernels at build time)."""


def check_compatible(info: Mapping, flavour: str, version: str) -> None:
    """Raise :class:`EetError` unless a plan described by sidecar ``info`` can be run by TensorRT ``flavour``
    ``version`` with this EET's plugins.

    A plan is tied to the exact TensorRT flavour and version that built it; its plugin nodes to the plugin
    versions of :mod:`eet.plugins.spec`.
    """
    from eet.plugins import spec

    built = info.get("tensorrt") or {}
    if built.get("flavour") != flavour:
        raise EetError(f"the plan was built with {built.get('flavour')} {built.get('version')}, and this process "
                       f"has {flavour} {version}: a plan runs only on the TensorRT flavour that built it; install "
                       f"{built.get('flavour')} {built.get('version')} or rebuild with `eet build`")
    if built.get("version") != version:
        raise EetError(f"the plan was built with {flavour} {built.get('version')}, and this process has {flavour} "
                       f"{version}: plans are tied to the TensorRT version; rebuild with `eet build`")
    known = spec.PLUGINS
    for plugin in info.get("plugins", []):
        mine = known.get(plugin.get("name"))
        if mine is None:
            raise EetError(f"the plan uses plugin {plugin.get('name')!r}, which this EET does not provide; "
                           "rebuild with `eet build`")
        if str(plugin.get("version")) != mine.version or plugin.get("namespace", mine.namespace) != mine.namespace:
            raise EetError(f"the plan uses {mine.name} version {plugin.get('version')} (namespace "
                           f"{plugin.get('namespace')}), this EET provides version {mine.version} (namespace "
                           f"{mine.namespace}); rebuild with `eet build`")
    if info.get("family") not in ("bert", "gpt2"):
        raise EetError(f"unknown model family {info.get('family')!r} in the sidecar; rebuild with `eet build`")


def unsupported_gpu_message(gpu, flavour: str, version: str, log: Sequence[str]) -> str:
    """The error for a plan that TensorRT would not deserialize on ``gpu`` (a :class:`GpuInfo`)."""
    details = "; ".join(log[-3:]) if log else "no message from TensorRT"
    hint = ("TensorRT-RTX runs on the GPUs it lists (GeForce / RTX workstation GPUs, compute capability 7.5-8.9 "
            "and 10.0+); on a data-center GPU such as an H100 use full TensorRT (`pip install tensorrt`, then "
            "rebuild)" if flavour == "tensorrt_rtx" else "rebuild the engine on this machine with `eet build`")
    return (f"{flavour} {version} cannot run this plan on {gpu}: {details}. {hint}")


def _collecting_logger(trt):
    """A TensorRT logger printing warnings and keeping error messages (``.errors``)."""
    t = trt.module

    class Logger(t.ILogger):
        def __init__(self):
            t.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (t.ILogger.Severity.ERROR, t.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))
            elif severity == t.ILogger.Severity.WARNING:
                print(f"[TensorRT] {msg}")

    return Logger()


@dataclass(frozen=True)
class TensorIO:
    """One engine input or output: ``name``, numpy ``dtype``, ``is_input``, and ``nbytes``, the size of its
    device buffer (the largest shape any profile allows)."""

    name: str
    dtype: np.dtype
    is_input: bool
    nbytes: int


class ProfileContext:
    """One execution context bound to one optimization profile, with its own stream.

    Every I/O tensor is bound once to the engine's shared device buffer; :meth:`set_shapes` changes only the
    input shapes that differ from the last call.
    """

    def __init__(self, engine: "Engine", index: int, runtime_config=None):
        self.index = index
        self.stream = engine.device.stream()
        trt_engine = engine.trt_engine
        context = (trt_engine.create_execution_context(runtime_config) if runtime_config is not None
                   else trt_engine.create_execution_context())
        if context is None:
            raise EetError(f"TensorRT could not create an execution context for profile {index} "
                           f"({'; '.join(engine.log.errors[-3:]) or 'no message'})")
        self.context = context
        if not context.set_optimization_profile_async(index, self.stream.handle):
            raise EetError(f"TensorRT refused optimization profile {index}")
        self.stream.synchronize()
        self._shapes: dict[str, tuple[int, ...]] = {}

    def max_shapes(self, engine: "Engine") -> dict[str, tuple[int, ...]]:
        """Every I/O tensor's largest shape under this profile (inputs from the profile, outputs inferred)."""
        shapes = {}
        for name in engine.input_names:
            if -1 in tuple(engine.trt_engine.get_tensor_shape(name)):
                shapes[name] = tuple(engine.trt_engine.get_tensor_profile_shape(name, self.index)[2])
            else:
                shapes[name] = tuple(engine.trt_engine.get_tensor_shape(name))
        self.set_shapes(shapes)
        for name in engine.output_names:
            shapes[name] = tuple(self.context.get_tensor_shape(name))
        return shapes

    def bind(self, addresses: Mapping[str, int]) -> None:
        for name, address in addresses.items():
            if not self.context.set_tensor_address(name, address):
                raise EetError(f"TensorRT refused the address of {name!r}")

    def set_shapes(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """Set input shapes; raises :class:`EetError` naming an input whose shape the profile does not allow."""
        for name, shape in shapes.items():
            shape = tuple(int(s) for s in shape)
            if self._shapes.get(name) != shape:
                if not self.context.set_input_shape(name, shape):
                    raise EetError(f"input {name!r} of shape {shape} is outside optimization profile {self.index}")
                self._shapes[name] = shape

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.handle):
            raise EetError(f"TensorRT failed to enqueue the engine (profile {self.index})")


class InFlight:
    """An engine call submitted without waiting: its staging ``slot`` and whatever the submitter records about it
    (keyword arguments become attributes). ``done`` once waited for; ``stale`` once its slot was handed to a later
    call (its results are gone)."""

    def __init__(self, slot: "StagingSlot", **info):
        self.slot, self.done, self.stale = slot, False, False
        self.__dict__.update(info)


@dataclass
class StagingSlot:
    """Pinned host buffers of one call in flight (``host``), the event recorded after its last copy, and the call."""

    host: dict
    event: object
    call: InFlight | None = None


class Staging:
    """Two sets of pinned host buffers, so that one call can be submitted while the previous one still runs.

    Args:
        device: makes the events (``device.event()``).
        make_host: returns one set of host buffers (a dict of pinned arrays).
    """

    def __init__(self, device, make_host: Callable[[], dict]):
        self.slots = [StagingSlot(make_host(), device.event()) for _ in range(2)]
        self._turn = 0

    def take(self) -> StagingSlot:
        """The next slot; a call still using it is waited for, and its results can no longer be collected."""
        slot = self.slots[self._turn]
        self._turn ^= 1
        if slot.call is not None:
            if not slot.call.done:
                slot.event.synchronize()
            slot.call.stale = True
            slot.call = None
        return slot

    def issue(self, slot: StagingSlot, stream, **info) -> InFlight:
        """Record the end of the call enqueued on ``stream`` with ``slot``'s buffers; the handle to wait on
        (``.stream`` is that stream)."""
        slot.event.record(stream)
        slot.call = InFlight(slot, stream=stream, **info)
        return slot.call

    def wait(self, call: InFlight, what: str = "call") -> dict:
        """Wait for ``call``'s copies; its slot's host buffers. Raises :class:`EetError` for a stale call."""
        if call.stale:
            raise EetError(f"this {what}'s results were overwritten: collect a {what} before submitting two more")
        call.slot.event.synchronize()
        call.done = True
        return call.slot.host

    def drain(self) -> None:
        """Wait for every call in flight (their results stay collectable)."""
        for slot in self.slots:
            if slot.call is not None and not slot.call.done:
                slot.event.synchronize()
                slot.call.done = True


RUNTIME_CACHE_DIR = "runtime_cache"
"""Where :func:`load` keeps TensorRT-RTX's runtime cache by default: ``DIR/runtime_cache/`` of the engine
directory, one file per plan and compute capability (``eet build`` empties it when it writes a new plan)."""


def default_runtime_cache_path(directory: Path, plan_sha256: str, capability: tuple[int, int]) -> Path:
    """``DIR/runtime_cache/<first 16 hex digits of the plan's sha256>-sm<major><minor>.bin``."""
    return Path(directory) / RUNTIME_CACHE_DIR / f"{plan_sha256[:16]}-sm{capability[0]}{capability[1]}.bin"


class RuntimeCache:
    """TensorRT-RTX's cache of the kernels it compiles when a context meets a new shape
    (``IRuntimeConfig.create_runtime_cache``), shared by all contexts of one engine and kept in a file across
    processes, so a later :func:`load` of the same plan on the same kind of GPU skips those compilations.

    ``path`` None keeps the cache in memory only. A file TensorRT-RTX does not accept (corrupt, another GPU
    or version) is ignored with a warning and replaced at :meth:`save`; a file that cannot be written is
    reported with a warning, never an error (the engine's results do not depend on the cache).
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.cache = None
        self.on_disk = b""  # the file's bytes as last read or written here (b"": none)

    def attach(self, config) -> None:
        """Give runtime config ``config`` the shared cache (made from the first config, then loaded from
        :attr:`path`); a flavour without runtime caches is left alone."""
        if not hasattr(config, "set_runtime_cache"):
            return
        if self.cache is None:
            self.cache = config.create_runtime_cache()
            if self.cache is None:
                warnings.warn("TensorRT-RTX did not create a runtime cache; kernels compile in every process")
                self.path = None
                return
            self._load()
        config.set_runtime_cache(self.cache)

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            blob = self.path.read_bytes()
        except OSError as exc:
            warnings.warn(f"could not read the runtime cache {self.path} ({exc.strerror or exc}); kernels compile "
                          "again")
            return
        if blob and self.cache.deserialize(blob):
            self.on_disk = blob
        else:
            self.cache.reset()
            warnings.warn(f"TensorRT-RTX did not accept the runtime cache {self.path} (another GPU or version, or a "
                          "damaged file); kernels compile again and the file is replaced when the engine closes")

    def save(self) -> bool:
        """Write the cache to :attr:`path` if it changed since it was loaded (atomically: a temporary file
        renamed over it). Returns whether a file was written."""
        if self.cache is None or self.path is None:
            return False
        memory = self.cache.serialize()
        blob = bytes(memory) if memory is not None else b""
        if not blob or blob == self.on_disk:
            return False
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(blob)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            warnings.warn(f"could not save the runtime cache to {self.path} ({exc.strerror or exc}): the next load "
                          "compiles its kernels again; pass runtime_cache=PATH (a writable file) or None")
            return False
        self.on_disk = blob
        return True


@dataclass(frozen=True)
class WarmShape:
    """One shape bucket run by :meth:`Engine.warm_up`: ``profile`` (BERT ``packed``; GPT-2 ``context`` or
    ``decode``), ``shape`` (packed: (tokens, sequences); context: (rows, prompt width); decode: (rows, 1)) and the
    host ``seconds`` its run took (mostly TensorRT-RTX compiling kernels for it, unless they were cached)."""

    profile: str
    shape: tuple[int, ...]
    seconds: float

    def __str__(self) -> str:
        return f"{self.profile} {' x '.join(map(str, self.shape))}: {self.seconds:.2f} s"


class Engine:
    """A deserialized EET engine with its contexts and buffers. Use :func:`load` to make one.

    Attributes:
        directory: the engine directory; ``info``: its sidecar; ``trt``: the TensorRT flavour (:mod:`eet.trt`);
        ``device``: the :class:`~eet.runtime.device.Device`; ``io``: name -> :class:`TensorIO`;
        ``buffers``: name -> device allocation (shared by all contexts); ``contexts``: one
        :class:`ProfileContext` per optimization profile, in profile order.
    """

    family = ""
    auto_graphs = ""
    """What ``cuda_graphs="auto"`` means for this family ("": ``engine`` where the flavour has it, else ``stream``)."""

    def __init__(self, directory: Path, info: dict, trt, device, trt_engine, log, graphs: str = "auto",
                 specialization: str = "auto", runtime_cache: Path | None = None, shape_buckets: bool = True):
        self._graphs: dict = {}  # shape key -> its CUDA graph (_launch_graphed)
        self._warm: set = set()  # shape keys run once (TensorRT has settled their kernels)
        self.directory, self.info, self.trt, self.device = directory, info, trt, device
        self.trt_engine, self.log = trt_engine, log
        self.shape_buckets = shape_buckets
        self.runtime_cache = RuntimeCache(runtime_cache)
        if specialization not in SPECIALIZATION_MODES:
            raise EetError(f"unknown kernel specialization {specialization!r}: use one of "
                           f"{', '.join(SPECIALIZATION_MODES)}")
        self.specialization = specialization
        if graphs not in GRAPH_MODES:
            raise EetError(f"unknown cuda_graphs mode {graphs!r}: use one of {', '.join(GRAPH_MODES)}")
        has_engine_graphs = hasattr(trt.module, "CudaGraphStrategy")
        auto = self.auto_graphs or ("engine" if has_engine_graphs else "stream")
        self.graphs = auto if graphs == "auto" else graphs
        if self.graphs == "engine" and not has_engine_graphs:
            raise EetError(f"{trt.flavour} {trt.version} has no engine-side CUDA graph capture; use "
                           "cuda_graphs='stream'")
        t = trt.module
        self.input_names, self.output_names = [], []
        for i in range(trt_engine.num_io_tensors):
            name = trt_engine.get_tensor_name(i)
            (self.input_names if trt_engine.get_tensor_mode(name) == t.TensorIOMode.INPUT
             else self.output_names).append(name)
        self.contexts: list[ProfileContext] = []
        self.buffers: dict = {}
        self._closed = False
        try:
            self.contexts = [ProfileContext(self, p, self._runtime_config(p))
                             for p in range(trt_engine.num_optimization_profiles)]
            sizes: dict[str, int] = {}
            for ctx in self.contexts:
                for name, shape in ctx.max_shapes(self).items():
                    dtype = np.dtype(t.nptype(trt_engine.get_tensor_dtype(name)))
                    sizes[name] = max(sizes.get(name, 0), math.prod(shape) * dtype.itemsize)
            self.io = {name: TensorIO(name, np.dtype(t.nptype(trt_engine.get_tensor_dtype(name))),
                                      name in self.input_names, sizes[name]) for name in sizes}
            self.buffers = {name: device.alloc(io.nbytes) for name, io in self.io.items()}
            for ctx in self.contexts:
                ctx.bind({name: int(buf) for name, buf in self.buffers.items()})
        except BaseException:
            self.close()
            raise

    def _runtime_config(self, profile: int):
        """The runtime configuration of the context for ``profile`` (None: the flavour's default)."""
        t = self.trt.module
        if not hasattr(self.trt_engine, "create_runtime_config"):
            return None
        config = self.trt_engine.create_runtime_config()
        strategy = getattr(t, "DynamicShapesKernelSpecializationStrategy", None)
        if strategy is not None:
            mode = self._specialization(profile)
            config.dynamic_shapes_kernel_specialization_strategy = getattr(strategy, mode.upper())
        self.runtime_cache.attach(config)
        return config

    def _specialization(self, profile: int) -> str:
        """The specialization mode of ``profile``'s context (``auto`` resolved: eager)."""
        return "eager" if self.specialization == "auto" else self.specialization

    # ---- life cycle
    def close(self) -> None:
        """Free the contexts, the engine, every buffer, and release the CUDA context (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for ctx in self.contexts:
            ctx.stream.synchronize()
        self.runtime_cache.save()
        self._release()
        self.contexts = []
        self.trt_engine = None
        for buf in self.buffers.values():
            buf.free()
        self.buffers = {}
        self.device.close()

    def _release(self) -> None:
        """Free what is held on the device besides the contexts and buffers (the CUDA graphs) before they go."""
        for graph in self._graphs.values():
            graph.close()
        self._graphs.clear()

    def _launch_graphed(self, ctx: ProfileContext, key) -> None:
        """Run ``ctx``'s engine at the shapes set on it, from the CUDA graph of shape ``key`` (``cuda_graphs``
        ``stream``): the first call at a shape runs plainly (TensorRT settles its kernels for the shape), the
        second captures ``execute_async_v3`` with the driver's stream capture, and every call after replays the
        graph (values in the buffers may change; addresses and shapes may not)."""
        graph = self._graphs.get(key)
        if graph is None:
            if key not in self._warm:
                self._warm.add(key)
                ctx.execute()
                return
            from eet.runtime.device import CudaGraph

            graph = self._graphs[key] = CudaGraph(ctx.stream.handle, ctx.execute)
        graph.launch()

    def save_runtime_cache(self) -> bool:
        """Write the kernels TensorRT-RTX compiled so far to the runtime cache file now (:meth:`close` does it
        too); returns whether a file was written (False: nothing new, no file, or a warning said why)."""
        self._require_open()
        return self.runtime_cache.save()

    def bucket_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The (profile, shape) of every shape bucket, in the order :meth:`warm_up` runs them."""
        raise NotImplementedError

    def _run_shape(self, profile: str, shape: tuple[int, ...]) -> None:
        """Run one shape bucket of :meth:`bucket_shapes` once, on dummy inputs (outputs dropped)."""
        raise NotImplementedError

    def warm_up(self, on_shape: Callable[[WarmShape], None] | None = None) -> list[WarmShape]:
        """Run every shape bucket once (dummy inputs, outputs dropped), so that TensorRT-RTX compiles their
        kernels now rather than in the first request that meets each bucket (0.1-2 s apiece on an H100), and
        write the runtime cache file (:meth:`save_runtime_cache`): a later :func:`load` of this plan on this kind
        of GPU reads them back. GPT-2 also captures each batch bucket's decode-step CUDA graph, BERT each bucket's call
        (when its calls run from graphs).

        Args:
            on_shape: called with each :class:`WarmShape` as soon as it has run (progress).

        Returns:
            one :class:`WarmShape` per bucket, in :meth:`bucket_shapes` order.

        Raises:
            EetError: the engine was loaded with ``shape_buckets=False`` (its calls run at their exact shapes,
                too many to warm up), or a BERT plan has no room for bucket fillers.
        """
        import time

        self._require_open()
        if not self.shape_buckets:
            raise EetError("warm_up() runs each shape bucket once, but this engine was loaded with "
                           "shape_buckets=False, so its calls run at their exact shapes: load it with "
                           "shape_buckets=True (the default)")
        done = []
        for profile, shape in self.bucket_shapes():
            t0 = time.perf_counter()
            self._run_shape(profile, shape)
            done.append(WarmShape(profile, tuple(shape), time.perf_counter() - t0))
            if on_shape is not None:
                on_shape(done[-1])
        self.runtime_cache.save()
        return done

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _require_open(self) -> None:
        if self._closed:
            raise EetError("this engine is closed; load it again with eet.runtime.load()")

    # ---- transfers on a context's stream
    def upload(self, ctx: ProfileContext, name: str, host: np.ndarray) -> None:
        self.device.cuda.memcpy_htod_async(self.buffers[name], host, ctx.stream)

    def download(self, ctx: ProfileContext, name: str, host: np.ndarray) -> None:
        self.device.cuda.memcpy_dtoh_async(host, self.buffers[name], ctx.stream)

    def tokenizer(self):
        """The model's Hugging Face tokenizer from ``DIR/tokenizer`` (None when the engine has none)."""
        if not hasattr(self, "_tokenizer"):
            name = self.info["files"].get("tokenizer")
            self._tokenizer = None
            if name and (self.directory / name).is_dir():
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(str(self.directory / name))
        return self._tokenizer

    def describe(self) -> str:
        return (f"{self.family} engine {self.directory} ({self.info['dtype']}, {self.trt.flavour} {self.trt.version}) "
                f"on {self.device.info}")


def load(directory: str | Path, *, device: int = 0, cuda_graphs: str = "auto", specialization: str = "auto",
         runtime_cache: str | Path | None = "auto", shape_buckets: bool = True, warm_up: bool = False,
         deserialize_hook: Callable[[], ContextManager] | None = None):
    """Load the engine in ``directory`` (written by ``eet build``) on GPU ``device``.

    Args:
        directory: the engine directory (``engine.plan`` + ``engine.json``).
        device: CUDA device ordinal (default 0).
        cuda_graphs: CUDA-graph capture of the GPT-2 decode step and of BERT's calls (per shape bucket), one of
            :data:`GRAPH_MODES` (default ``auto``).
        specialization: TensorRT-RTX's shape-specialized kernels, one of :data:`SPECIALIZATION_MODES`.
        runtime_cache: file of TensorRT-RTX's compiled kernels (:class:`RuntimeCache`), read here and written
            when the engine closes: ``auto`` (default) a file under ``directory/runtime_cache/`` named by the
            plan and the GPU's compute capability (:func:`default_runtime_cache_path`), a path, or None (kept in
            memory only). Ignored by flavours without runtime caches.
        shape_buckets: round each call's shape up to one of a few buckets (default True), because TensorRT-RTX
            spends 0.1-1.7 s on every input shape it has not met before: BERT calls are filled to a token
            bucket (:func:`eet.runtime.bert.token_bucket`) and the profile's sequence count, GPT-2 prompt batches
            are left-padded to a multiple of 64 tokens and run as a power-of-two number of rows
            (:func:`eet.runtime.generation.batch_bucket`). False: every call runs at its exact shape.
        warm_up: run every shape bucket once before returning (:meth:`Engine.warm_up`; default False). Costs
            seconds to a minute without a runtime cache file that holds them (``eet warm DIR`` writes one), and
            spares each bucket's first request that cost.
        deserialize_hook: a context-manager factory wrapped around deserialization (tests only; default none).

    Returns:
        a :class:`~eet.runtime.bert.BertEngine` or :class:`~eet.runtime.gpt2.Gpt2Engine`; close it (or use
        ``with``) to free the GPU memory.

    Raises:
        EetError: see the module docstring.
    """
    from eet.runtime import sidecar
    from eet.runtime.device import Device

    folder = Path(directory)
    info = sidecar.read(folder)
    trt = _tensorrt_for(info)
    from eet.plugins import _lib

    try:
        _lib.load_library()  # a missing or stale kernel library fails here, not inside TensorRT
    except RuntimeError as exc:
        raise EetError(str(exc)) from exc
    dev = Device(device)
    try:
        trt_engine, log = _deserialize(trt, dev, folder / info["files"]["plan"], deserialize_hook)
        from eet.runtime.bert import BertEngine
        from eet.runtime.gpt2 import Gpt2Engine

        cls = {"bert": BertEngine, "gpt2": Gpt2Engine}[info["family"]]
        if runtime_cache == "auto":
            runtime_cache = default_runtime_cache_path(folder, info["plan_sha256"], dev.info.capability)
        engine = cls(folder, info, trt, dev, trt_engine, log, cuda_graphs, specialization,
                     Path(runtime_cache) if runtime_cache is not None else None, shape_buckets=shape_buckets)
    except BaseException:
        dev.close()
        raise
    if warm_up:
        try:
            engine.warm_up()
        except BaseException:
            engine.close()
            raise
    return engine


def _tensorrt_for(info: Mapping):
    """The installed TensorRT flavour the plan of sidecar ``info`` was built with, checked by
    :func:`check_compatible` (which names what is installed and what the plan needs when they differ)."""
    from eet import trt as trt_compat

    wanted = (info.get("tensorrt") or {}).get("flavour")
    try:
        trt = trt_compat.load(wanted if wanted in trt_compat.FLAVOURS else None)
    except EetError:
        trt = trt_compat.load()
    check_compatible(info, trt.flavour, trt.version)
    return trt


def _deserialize(trt, dev, plan: Path, hook):
    """(ICudaEngine, its logger): the plan deserialized on ``dev`` with the EET plugins registered."""
    from eet.plugins.tensorrt import register

    register(trt)
    log = _collecting_logger(trt)
    runtime = trt.module.Runtime(log)
    with (hook or contextlib.nullcontext)():
        trt_engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if trt_engine is None:
        raise EetError(unsupported_gpu_message(dev.info, trt.flavour, trt.version, log.errors))
    log.runtime = runtime  # the runtime must outlive the engine
    return trt_engine, log


def load_plain(directory: str | Path, *, device: int = 0, specialization: str = "auto",
               deserialize_hook: Callable[[], ContextManager] | None = None) -> Engine:
    """The plain baseline ``DIR/plain.plan`` (``eet build bert --plain-baseline``) as a generic :class:`Engine`
    (contexts, buffers and transfers, no encode()): what `eet bench` compares the EET engine with."""
    from eet.runtime import sidecar
    from eet.runtime.device import Device

    folder = Path(directory)
    info = sidecar.read(folder)
    plan = folder / "plain.plan"
    if not plan.is_file():
        raise EetError(f"{folder} has no plain.plan: build with `eet build bert --plain-baseline`")
    trt = _tensorrt_for(info)
    dev = Device(device)
    try:
        trt_engine, log = _deserialize(trt, dev, plan, deserialize_hook)
        return Engine(folder, info, trt, dev, trt_engine, log, "off", specialization)
    except BaseException:
        dev.close()
        raise
