"""Every use of FFCV internals, in one module.

FFCV 1.0.2's public API (``Loader``, ``DatasetWriter``, the fields, decoders and transforms) is used where it is
needed; anything that relies on how FFCV works inside (its module globals, its iterator thread, its metadata
table, its writer's progress bar and poll loop, its C kernels) lives here, so checking a new FFCV release means
reading this file. ``tests/test_layout.py`` fails if another module of the library imports an FFCV internal.

- :class:`BoundOrder`: a traversal order created before its ``Loader``;
- :func:`start_epoch`, :func:`next_batch`, :func:`stop_iterator`: the ``EpochIterator`` lifecycle, made
  unable to hang when FFCV's thread dies or is stopped early;
- :func:`read_metadata`: the per-field metadata tables of a ``.beton`` (no Loader, no decoding);
- ``JPG_MODE``, ``imdecode``, ``resize``, :func:`parallel_range`: what a compiled image decoder calls;
- :class:`GuardedSource`, :func:`patched_writer`, :func:`release_writer_memory`: the writer's progress bar
  and a watchdog for its worker processes, patched in while one file is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import ffcv.writer as _ffcv_writer
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES
from ffcv.libffcv import ctypes_imdecode, ctypes_resize
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import IS_CUDA
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.traversal_order.base import TraversalOrder

__all__ = [
    "JPG_MODE",
    "BetonSourceError",
    "BoundOrder",
    "GuardedSource",
    "imdecode",
    "next_batch",
    "parallel_range",
    "patched_writer",
    "read_metadata",
    "release_writer_memory",
    "resize",
    "start_epoch",
    "stop_iterator",
]

# ----------------------------------------------------------------------------------------------------
# Traversal orders and the epoch iterator
# ----------------------------------------------------------------------------------------------------


class BoundOrder(TraversalOrder):
    """A TraversalOrder created before its Loader. FFCV 1.0.2's ``Loader`` accepts an *instance* as ``order``
    and calls it with itself (``order(loader)``); ``__call__`` binds and returns the same object, so the
    caller keeps a handle to change the position between epochs."""

    def __init__(self) -> None:  # TraversalOrder.__init__ needs the loader; it runs in __call__
        self.loader = None

    def __call__(self, loader: Loader) -> BoundOrder:
        if self.loader is not None and self.loader is not loader:
            raise RuntimeError("an order object can serve one Loader only")
        TraversalOrder.__init__(self, loader)
        return self


def start_epoch(loader: Loader, epoch: int) -> Any:
    """A new ``EpochIterator`` over epoch ``epoch`` (the Loader reads its epoch from ``next_epoch``)."""
    loader.next_epoch = int(epoch)
    return iter(loader)


def next_batch(it: Any) -> tuple:
    """``EpochIterator.__next__`` that cannot hang: FFCV's blocks forever on its queue when the loader
    thread died (e.g. a numba compilation error), since the end marker is then never queued."""
    while True:
        try:
            item = it.output_queue.get(timeout=1.0)
            break
        except queue.Empty:
            if not it.is_alive():
                try:
                    item = it.output_queue.get_nowait()
                    break
                except queue.Empty:
                    raise RuntimeError(
                        "FFCV's loader thread stopped without finishing the epoch; its exception was "
                        "reported by threading.excepthook (printed to stderr by default)"
                    ) from None
    if item is None:
        it.close()
        raise StopIteration
    slot, result = item
    if IS_CUDA:
        it.current_stream.wait_stream(it.cuda_streams[slot])
    return result


def stop_iterator(it: Any, timeout: float = 120.0) -> None:
    """Stop an ``EpochIterator`` and wait (up to ``timeout`` seconds) for its thread to exit."""
    it.close()
    # FFCV's thread only checks the stop flag while its queue is full, and its final end-of-epoch
    # marker is put without a timeout: drain the queue so it can always reach the end and exit.
    deadline = time.monotonic() + timeout
    while it.is_alive() and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            while True:
                it.output_queue.get_nowait()
        it.join(timeout=0.05)


# ----------------------------------------------------------------------------------------------------
# Reading a .beton's metadata
# ----------------------------------------------------------------------------------------------------


def read_metadata(path: str) -> tuple[int, dict[str, np.ndarray]]:
    """``(number of samples, {field name: its metadata table})`` of a ``.beton``, in field order. The table
    of an ``IntField`` is its values; an ``RGBImageField``'s has ``height``, ``width``, ``mode`` and
    ``data_ptr`` columns."""
    reader = Reader(str(path))
    tables = {name: reader.metadata[f"f{ix}"] for ix, name in enumerate(reader.handlers)}
    return int(reader.num_samples), tables


# ----------------------------------------------------------------------------------------------------
# What a compiled image decoder calls
# ----------------------------------------------------------------------------------------------------

# The ``mode`` of a JPEG-encoded image in an RGBImageField's metadata.
JPG_MODE = IMAGE_MODES["jpg"]
# FFCV's C functions, callable through ctypes from numba-compiled code. (FFCV's decoders wrap them in small
# numba functions compiled per Loader; sharing such wrappers between Loaders hits a numba KeyError on their
# literal-argument overloads, and collecting them prints the same error.)
imdecode = ctypes_imdecode
resize = ctypes_resize


def parallel_range() -> Callable[..., Any]:
    """The loop range of a compiled pipeline stage: ``prange`` when the stage runs in parallel."""
    return Compiler.get_iterator()


# ----------------------------------------------------------------------------------------------------
# The writer: a rich progress bar and a watchdog over its worker processes
# ----------------------------------------------------------------------------------------------------


class BetonSourceError(RuntimeError):
    """A sample of the source could not be read while writing a .beton; the message is one line naming it."""


class GuardedSource:
    """Wraps a source for FFCV's writer processes: counts fetched samples and records the first failure in
    shared memory so the parent can stop instead of waiting forever (FFCV's writer polls a counter that a
    dead worker never advances). An exception of a type in `user_errors` (bad data: its message names the
    file) is recorded as its one-line message, and a writer process it stops ends without a traceback."""

    def __init__(self, source: Any, user_errors: tuple[type[BaseException], ...] = ()) -> None:
        self.source = source
        self.user_errors = user_errors
        self.parent = os.getpid()
        self.fetched = mp.Value(ctypes.c_int64, 0)
        self.failed = mp.Value(ctypes.c_int64, -1)
        self.user = mp.Value(ctypes.c_bool, False)
        self.message = mp.Array(ctypes.c_char, 4096)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        try:
            img, label, index = self.source[i]
            img = np.asarray(img)
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"sample {i}: image must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
            out = (np.ascontiguousarray(img), int(label), int(index))
        except BaseException as exc:
            user = isinstance(exc, self.user_errors)
            text = " ".join(str(exc).split()) if user else traceback.format_exc()
            with self.failed.get_lock():
                if self.failed.value < 0:
                    self.failed.value = int(i)
                    self.user.value = user
                    self.message.value = text.encode("utf-8", "replace")[-4000:]
            if user and os.getpid() != self.parent:
                os._exit(1)  # the parent's watchdog reports it in one line; no worker traceback on stderr
            if not user:
                sys.stderr.write(f"beton writer: sample {i} failed:\n{text}")
            raise
        with self.fetched.get_lock():
            self.fetched.value += 1
        return out


class _TrackedTqdm:
    """The part of tqdm's interface that ``ffcv.writer`` uses (``update``, ``close``), told through a progress
    tracker: a rich bar on a terminal, plain periodic lines in a job log."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def update(self, n: int = 1) -> None:
        self.tracker.advance(n)

    def close(self) -> None:
        pass


_WRITER_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def patched_writer(guard: GuardedSource, total: int, description: str, show: bool) -> Iterator[None]:
    """Swap ``ffcv.writer``'s tqdm for our progress tracker, and its poll ``sleep`` for one that watches the
    workers."""
    from invprop.progress import Reporter

    fw = _ffcv_writer
    before = {p.pid for p in mp.active_children()}

    def watchdog_sleep(seconds: float) -> None:
        time.sleep(seconds)
        if guard.failed.value >= 0:
            msg = guard.message.value.decode("utf-8", "replace")
            if guard.user.value:
                raise BetonSourceError(f"writing the .beton stopped at sample {guard.failed.value}: {msg}")
            raise RuntimeError(f"writing the beton failed on sample {guard.failed.value}:\n{msg}")
        alive = [p for p in mp.active_children() if p.pid not in before]
        if not alive and guard.fetched.value < total:
            raise RuntimeError(
                f"all beton writer processes exited after {guard.fetched.value} of {total} samples "
                "(killed? out of memory?)"
            )

    progress = Reporter(enabled=show).track(description, total, unit="img")
    with _WRITER_PATCH_LOCK:
        old_tqdm, old_sleep = fw.tqdm, fw.sleep
        fw.tqdm = lambda total=None, **kw: _TrackedTqdm(progress)
        fw.sleep = watchdog_sleep
        try:
            with progress:
                yield
        except BaseException:
            # End the writer processes this call started (and only those), so nothing keeps running.
            for p in mp.active_children():
                if p.pid not in before:
                    p.terminate()
            for p in mp.active_children():
                if p.pid not in before:
                    p.join(timeout=5)
            raise
        finally:
            fw.tqdm, fw.sleep = old_tqdm, old_sleep


def release_writer_memory(writer: Any) -> None:
    """Free the shared-memory metadata block of a ``DatasetWriter`` that failed (it leaks otherwise)."""
    sm = getattr(writer, "metadata_sm", None)
    if sm is not None and not isinstance(sm, int):
        with contextlib.suppress(Exception):
            sm.close()
        with contextlib.suppress(Exception):
            sm.unlink()
