"""Checkpoints written atomically and verified on load.

A checkpoint file is a header line, the SHA-256 of the payload, and the payload (what
``torch.save`` writes)::

    ATTNMEM-CHECKPOINT 1\\n<64 hex digits>\\n<torch.save bytes>

``save_atomic`` writes a temporary file beside the target, flushes it to disk and renames it
over the target, so a reader sees the old checkpoint or the new one, never half of one.
``load_checkpoint`` checks the header and the checksum before unpickling anything: a flipped
bit, a truncated or an empty file is a clear ``ValueError`` naming the file, never a
checkpoint silently resumed with a corrupted weight.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

MAGIC = b"ATTNMEM-CHECKPOINT 1\n"
DIGEST_LEN = 64  # hex digits of a SHA-256


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` with its checksum, atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved by ``save_atomic``, after checking that it is whole.

    Raises:
        ValueError: naming ``path``, for an empty file, a file without the header (not written
            by this version of attnmem), a checksum that does not match (corruption), or a
            payload that does not unpickle to a dict.
    """
    data = path.read_bytes()
    advice = "delete it to start again, or restore a good copy"
    if not data:
        raise ValueError(f"checkpoint {path} is empty; {advice}")
    head = len(MAGIC) + DIGEST_LEN + 1
    if not data.startswith(MAGIC) or len(data) < head or data[head - 1:head] != b"\n":
        raise ValueError(f"checkpoint {path} is not an attnmem checkpoint with a checksum "
                         f"(it lacks the {MAGIC.strip().decode()!r} header); {advice}")
    expected = data[len(MAGIC):head - 1].decode("ascii", errors="replace")
    payload = data[head:]
    actual = hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise ValueError(f"checkpoint {path} is corrupt: its SHA-256 is {actual[:12]}…, the header says "
                         f"{expected[:12]}…; {advice}")
    try:
        state = torch.load(io.BytesIO(payload), weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); {advice}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} does not hold a training state; {advice}")
    return state
