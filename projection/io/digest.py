"""Content digests of files, cheap enough for checkpoints of tens of GB: whole for small files, a safetensors
header plus sampled blocks for large ones, kept per file identity within the process."""
from __future__ import annotations

import hashlib
import os
import struct
import time

from ..cache import FILE_DIGESTS, Lru
from .checkpoint import MAX_HEADER_BYTES
from .inputs import regular_fd

WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole
SAMPLES, SAMPLE_BYTES = 16, 64 << 10  # larger ones: their safetensors header and these blocks, evenly spaced
SETTLED_NS = 2_000_000_000  # a file changed this recently may change again within its ctime's granularity
_digests: Lru[tuple, str] = Lru(FILE_DIGESTS)  # (path, dev, inode, size, mtime, ctime) -> digest


def file_digest(path: str | os.PathLike, safetensors: bool) -> str:
    """A content digest of one file (a teacher's weights, a pipeline component's): sha256 of its size and, up to
    WHOLE_FILE_BYTES, all its bytes; above that, of its safetensors header (length and JSON) and SAMPLES blocks of SAMPLE_BYTES at evenly spaced offsets
    (the first at 0, the last ending at the end). A large file changed only outside those blocks, its header
    unchanged, keeps its digest. Kept per (path, device, inode, size, mtime, ctime) within the process; ctime
    changes on every write and cannot be set back, so a file rewritten in place with its mtime restored is hashed
    again."""
    fd = regular_fd(path)
    try:
        st = os.fstat(fd)
        seen = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        known = _digests.get(seen)
        if known is not None:
            return known
        started, size = time.time_ns(), st.st_size
        h = hashlib.sha256(f"{size}\n".encode())
        if size <= WHOLE_FILE_BYTES:
            offset = 0
            while offset < size and (chunk := os.pread(fd, min(1 << 20, size - offset), offset)):
                h.update(chunk)
                offset += len(chunk)
        else:
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            if safetensors and 0 < n <= MAX_HEADER_BYTES and 8 + n <= size:
                h.update(os.pread(fd, 8 + n, 0))
            for i in range(SAMPLES):
                h.update(os.pread(fd, SAMPLE_BYTES, i * (size - SAMPLE_BYTES) // (SAMPLES - 1)))
    finally:
        os.close(fd)
    digest = h.hexdigest()
    if started - st.st_ctime_ns >= SETTLED_NS:  # changed just before: a rewrite may keep this ctime
        _digests.put(seen, digest)
    return digest
