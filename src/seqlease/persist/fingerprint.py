"""Which weights a state was computed with: a digest of the model file, cheap to take."""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from pathlib import Path
from typing import BinaryIO

__all__ = ["model_fingerprint"]

_BLOCKS = 16
_BLOCK = 64 * 1024
#: Digests kept, by file identity: a process loads few model files.
_KEPT = 8

_Identity = tuple[int, int, int, int, int]
_digests: collections.OrderedDict[_Identity, str] = collections.OrderedDict()
_lock = threading.Lock()


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """A hex digest of the GGUF file's size and 16 blocks of 64 KiB spread across it.

    Reading 1 MiB costs milliseconds where hashing a whole model costs seconds, and it still
    tells models apart: the first block holds the metadata, and weights that differ anywhere
    (another model, fine-tune or quantization) differ in every block.

    The file is opened once; the digest is read from that open file and cached under its
    identity from ``fstat`` (device, inode, size, mtime, ctime). A file replaced or rewritten
    since is another inode or has a newer ctime, which no tool can set back (unlike the mtime
    ``cp -p`` or ``rsync -t`` keep), so it is read again rather than given the old file's
    digest.
    """
    with open(Path(path), "rb") as file:
        st = os.fstat(file.fileno())
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with _lock:
            if (known := _digests.get(identity)) is not None:
                _digests.move_to_end(identity)
                return known
        digest = _digest(file, st.st_size)
    with _lock:
        _digests[identity] = digest
        while len(_digests) > _KEPT:
            _digests.popitem(last=False)
    return digest


def _digest(file: BinaryIO, size: int) -> str:
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    last = max(0, size - _BLOCK)
    for i in range(_BLOCKS):
        file.seek(last * i // (_BLOCKS - 1))
        digest.update(file.read(_BLOCK))
    return digest.hexdigest()
