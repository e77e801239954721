"""NumPy stand-ins for the runtime's CUDA side (PyCUDA copies, events, pinned buffers): enough to drive the
engines' submit/collect logic on a CPU, where every copy and step runs at once."""
import numpy as np

from eet.runtime.device import GpuInfo


class FakeCuda:
    """PyCUDA's async copies as immediate NumPy copies (device buffers are uint8 arrays)."""

    @staticmethod
    def memcpy_htod_async(dst, src, stream):
        dst.view(src.dtype)[: src.size] = src

    @staticmethod
    def memcpy_dtoh_async(dst, src, stream):
        dst[:] = src.view(dst.dtype)[: dst.size]

    @staticmethod
    def memcpy_dtod_async(dst, src, nbytes, stream):
        dst[:nbytes] = src[:nbytes]


class FakeEvent:
    """Records the streams it was recorded on and counts the waits."""

    def __init__(self):
        self.recorded, self.waits = [], 0

    def record(self, stream):
        self.recorded.append(stream)

    def synchronize(self):
        self.waits += 1


class FakeDevice:
    cuda = FakeCuda
    info = GpuInfo(0, "fake GPU", (9, 0))

    def event(self):
        return FakeEvent()

    def pinned(self, n, dtype):
        return np.zeros(n, dtype)


class SavedCache:
    """Stands in for an engine's RuntimeCache: counts save() calls."""

    def __init__(self):
        self.saves = 0

    def save(self):
        self.saves += 1
        return True
