"""The ONNX backend's KV pool: one key and one value block per layer, ``[slots, kv_heads, context, head_dim]``.

A cache is a slot in the pool plus a length. A batched decode step binds a contiguous run of slots,
``block[start:start + n]``, as both past and present of every layer, so GroupQueryAttention writes each
row's new position in place; `arrange` moves caches (copying only their filled positions) when the
sequences decoding together do not sit side by side, which happens only as sequences join or leave.
On the CPU the blocks are anonymous mappings (pages are committed only as positions fill, and given back
when a slot is freed); on CUDA they are device OrtValues, moved with the CUDA runtime's 2-D copy.
"""

from __future__ import annotations

import functools
import mmap
import weakref
from typing import Any, Protocol

import numpy as np

from gptcli.errors import BackendError


class SlotOwner(Protocol):
    slot: int
    length: int


class KvPool:
    """Slots of preallocated KV memory; a slot whose cache was released or garbage-collected is free again."""

    def __init__(self, blocks: int, kv_heads: int, context: int, head_dim: int, dtype: Any, device: str) -> None:
        self.block_count = blocks  # 2 per layer: key, value
        self.tail = (kv_heads, context, head_dim)
        self.dtype = np.dtype(dtype)
        self.device = device
        self.slot_bytes = kv_heads * context * head_dim * self.dtype.itemsize
        self.blocks: list[Any] = []
        self.owners: list[weakref.ref | None] = []
        self.generation = 0  # bumped whenever the blocks are reallocated: pointers into them are stale
        self._grow(1)

    @property
    def slots(self) -> int:
        return len(self.owners)

    def pointer(self, block: int, slot: int) -> int:
        """The address of `slot` in block `block` (a run of slots from there is one contiguous tensor)."""
        memory = self.blocks[block]
        base = memory.ctypes.data if isinstance(memory, np.ndarray) else memory.data_ptr()
        return base + slot * self.slot_bytes

    def acquire(self, owner: SlotOwner) -> None:
        """Give `owner` the lowest free slot (growing the pool when every slot is taken)."""
        owner.slot = self._free_slot(0)
        self.owners[owner.slot] = weakref.ref(owner, self._collected)

    def release(self, owner: SlotOwner) -> None:
        if self.owner_of(owner.slot) is owner:
            self.owners[owner.slot] = None
            self._give_back(owner.slot)
        owner.slot = -1

    def copy_prefix(self, source: SlotOwner, target: SlotOwner, length: int) -> None:
        """Copy positions [0, length) of `source`'s slot into `target`'s (every block)."""
        for block in range(self.block_count):
            self._copy(self.blocks[block], target.slot, self.blocks[block], source.slot, length)

    def owner_of(self, slot: int) -> SlotOwner | None:
        ref = self.owners[slot] if 0 <= slot < self.slots else None
        return ref() if ref is not None else None

    def arrange(self, owners: list[SlotOwner]) -> int:
        """Make `owners` occupy contiguous slots; return the first. Moves only when they are scattered."""
        count = len(owners)
        taken = sorted(o.slot for o in owners)
        if taken[-1] - taken[0] + 1 == count:
            return taken[0]
        settled = {o.slot for o in owners if o.slot < count}
        targets = [s for s in range(count) if s not in settled]
        movers = [o for o in owners if o.slot >= count]
        for owner, target in zip(movers, targets, strict=True):
            occupant = self.owner_of(target)
            if occupant is not None:  # someone not in this batch: out of the way, past the run
                self._move(occupant, self._free_slot(count))
            self._move(owner, target)
        return 0

    # ------------------------------------------------------------------ internals

    def _collected(self, ref: weakref.ref) -> None:
        for slot, held in enumerate(self.owners):
            if held is ref:
                self.owners[slot] = None
                self._give_back(slot)

    def _give_back(self, slot: int) -> None:
        """Return a freed slot's memory to the system (CPU); a later owner commits pages again as it fills.
        Kept, the pool held every slot as full as it had ever been: memory at its high-water mark, past
        what --kv-budget lets run (4 sequences of 2,048 positions, all ended: 360 MB on the default model)."""
        if self.device == "cuda" or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = -(-slot * self.slot_bytes // page) * page  # whole pages inside the slot only
        end = (slot + 1) * self.slot_bytes // page * page
        if end <= start:
            return
        for block in self.blocks:
            memory = block
            while memory is not None and not isinstance(memory, mmap.mmap):
                # the array's view chain down to its mapping (np.frombuffer's base is a memoryview of it)
                memory = memory.obj if isinstance(memory, memoryview) else getattr(memory, "base", None)
            if memory is not None:
                memory.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _free_slot(self, lowest: int) -> int:
        for slot in range(lowest, self.slots):
            if self.owner_of(slot) is None:
                self.owners[slot] = None
                return slot
        first_new = self.slots
        self._grow(max(2 * self.slots, lowest + 1))
        return max(first_new, lowest)

    def _move(self, owner: SlotOwner, target: int) -> None:
        for block in range(self.block_count):
            self._copy(self.blocks[block], target, self.blocks[block], owner.slot, owner.length)
        self.owners[target], self.owners[owner.slot] = self.owners[owner.slot], None
        self._give_back(owner.slot)
        owner.slot = target

    def _grow(self, slots: int) -> None:
        """Reallocate every block with `slots` slots, copying the filled positions of the live ones."""
        shape = (slots, *self.tail)
        new_blocks = []
        for block in range(self.block_count):
            if self.device == "cuda":
                import onnxruntime as ort

                fresh = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.dtype.type, "cuda", 0)
            else:
                fresh = _zero_pages(shape, self.dtype)
            for slot in range(self.slots):
                owner = self.owner_of(slot)
                if owner is not None:
                    self._copy(fresh, slot, self.blocks[block], slot, owner.length)
            new_blocks.append(fresh)
        self.blocks = new_blocks
        self.owners += [None] * (slots - self.slots)
        self.generation += 1

    def _copy(self, dst: Any, dst_slot: int, src: Any, src_slot: int, length: int) -> None:
        """Copy positions [0, length) of one slot (every head) between blocks."""
        if length <= 0 or (dst is src and dst_slot == src_slot):
            return
        if isinstance(dst, np.ndarray):
            dst[dst_slot, :, :length] = src[src_slot, :, :length]
            return
        kv_heads, context, head_dim = self.tail
        pitch = context * head_dim * self.dtype.itemsize  # one head's row of positions
        runtime = _cuda_runtime()
        status = runtime.cudaMemcpy2D(
            dst.data_ptr() + dst_slot * self.slot_bytes,
            pitch,
            src.data_ptr() + src_slot * self.slot_bytes,
            pitch,
            length * head_dim * self.dtype.itemsize,
            kv_heads,
            3,  # cudaMemcpyDeviceToDevice
        )
        if status != 0 or runtime.cudaDeviceSynchronize() != 0:  # ORT's stream must not race the copy
            raise BackendError(f"moving a KV cache slot on the GPU failed (CUDA error {status})")


def _zero_pages(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeroed memory committed 4 KiB at a time as positions fill: an anonymous mapping of its own.

    Not np.zeros: numpy asks the kernel for 2 MiB pages on arrays this large, and a slot's first prefill
    then pays for zeroing a 2 MiB page per head row it writes (the default model: 360 MB, about 1 s per
    128-token prompt into a fresh slot; 0.2 s with small pages).
    """
    if not hasattr(mmap, "MAP_ANONYMOUS"):  # Windows: commits on first touch by its own rules
        return np.zeros(shape, dtype=dtype)
    size = max(1, int(np.prod(shape)) * dtype.itemsize)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # where the kernel gives huge pages unasked (THP "always")
        memory.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(memory, dtype=dtype).reshape(shape)


@functools.cache
def _cuda_runtime() -> Any:
    """The CUDA runtime library ORT's CUDA provider already loaded (for device-to-device copies)."""
    import ctypes

    for name in ("libcudart.so.12", "libcudart.so.13", "libcudart.so", "cudart64_12.dll", "cudart64_13.dll"):
        try:
            runtime = ctypes.CDLL(name)
        except OSError:
            continue
        size = ctypes.c_size_t
        runtime.cudaMemcpy2D.argtypes = [ctypes.c_void_p, size, ctypes.c_void_p, size, size, size, ctypes.c_int]
        runtime.cudaMemcpy2D.restype = ctypes.c_int
        runtime.cudaDeviceSynchronize.restype = ctypes.c_int
        return runtime
    raise BackendError("cannot load the CUDA runtime (libcudart) to move KV cache slots on the GPU")
