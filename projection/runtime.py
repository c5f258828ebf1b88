"""Process-wide settings: chosen by a program (the `projection` CLI, the app), applied once by its entry point.

The library never applies them: importing `projection` or exporting through it changes no environment variable,
allocator setting, thread count or global RNG state. A program that embeds the library and wants the measured
gains calls `setup_runtime()` itself, as early as it can (before torch's first allocation for huge pages).
"""
from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

MMAP_THRESHOLD = 1 << 20  # bytes; see setup_runtime
PARALLEL_MIN_WIDTH = 1024  # models narrower than this run on one thread (`parallel_pays`); Wan's narrowest is 1536
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

_threads_lock = threading.Lock()
_interactive_threads: int | None = None  # set by setup_runtime(interactive_threads=...)
_all_threads = 0
_heavy = 0


def setup_runtime(interactive_threads: int | None = None) -> None:
    """Apply every process-wide setting of this program:

    1. `THP_MEM_ALLOC_ENABLE=1` (unless already set): torch puts tensors of 2 MiB and more on transparent huge
       pages. Streaming a teacher allocates fresh pages all the time, and on a VM each 4 KiB page fault is dear
       (exports 10-25% faster). Torch reads the variable at its first CPU allocation, so this must run before
       any tensor is made.
    2. glibc's mmap threshold pinned at 1 MiB: glibc raises the threshold as large buffers are freed, then keeps
       tensor-sized buffers on its heap, where they stay resident and fragment; pinned, every tensor-sized buffer
       is its own mapping, handed back to the OS when freed (an export's peak of 1.4 GB growing block after block
       became a steady 0.4 GB, for ~0.4 s of page faults). A no-op off glibc.
    3. `interactive_threads` (the app: 1): torch's intra-op threads for interactive work, where many small tensor
       operations cost more in thread hand-offs than they gain (re-projecting the demo on a busy 2-core machine:
       465 ms with 2 threads, 86 ms with 1). `heavy_work()` restores every core while a long operation runs.
    """
    global _interactive_threads, _all_threads
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc
        pass
    if interactive_threads is not None:
        with _threads_lock:
            _all_threads = _all_threads or torch.get_num_threads()
            _interactive_threads = interactive_threads
            if _heavy == 0:
                torch.set_num_threads(interactive_threads)


def parallel_pays(width: int | None) -> bool:
    """Whether torch's intra-op threads pay for work on a model this wide (unknown: assumed so). A narrow model's
    work is many small tensor operations whose thread hand-offs cost more than they save, and on a busy machine
    each one waits for a descheduled thread: `projection fidelity` on the demo teacher (width 128) with other work
    on both cores took 230 s on 2 threads and 9 s on 1."""
    return width is None or width >= PARALLEL_MIN_WIDTH


@contextmanager
def heavy_work(width: int | None = None) -> Iterator[None]:
    """Every core while any heavy operation (a full-teacher pass, an export, spectra) on a model of this width runs
    (`parallel_pays`; a narrow one keeps the interactive count); back to the interactive thread count when the last
    one ends. Torch's setting is process-wide, so concurrent operations share it. Does nothing unless
    `setup_runtime` chose an interactive thread count."""
    global _heavy
    if not parallel_pays(width):
        yield
        return
    with _threads_lock:
        _heavy += 1
        if _interactive_threads is not None:
            torch.set_num_threads(_all_threads)
    try:
        yield
    finally:
        with _threads_lock:
            _heavy -= 1
            if _heavy == 0 and _interactive_threads is not None:
                torch.set_num_threads(_interactive_threads)


@contextmanager
def command_threads(width: int | None) -> Iterator[None]:
    """One CLI command's threads for work on a teacher this wide: one thread where `parallel_pays` says threads
    do not pay, torch's own count otherwise; restored afterwards."""
    if parallel_pays(width):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
