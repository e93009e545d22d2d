"""attnmem's own C++ CPU kernels, compiled on first use.

``softcap.cpp``: soft-capped exact attention (``cap·tanh(s/cap)``, Gemma 2), forward and backward,
one fused kernel call per pass in O(N) memory (``torch.ops.attnmem_native.softcap_fwd`` /
``softcap_bwd``), under no mask, a window (``masks.SlidingWindow``: causal, Gemma 2's local
layers) and/or key padding, computing only the key blocks each block of query rows reaches. PyTorch's own CPU
flash kernel cannot apply a score modification between its product and its softmax; without
this one, a soft-capped call runs as torch ops per tile (``kernels.tile.softcap_forward``),
about twice the time of plain attention.

The library is built once per source, torch version and CPU (``-march=native``) with the C++
compiler that builds any torch extension (``g++``, or ``$CXX``), against torch's own headers and
libraries, into ``$ATTNMEM_CACHE`` (default ``~/.cache/attnmem``, or a temporary folder where
that is read-only), then loaded with ``torch.ops.load_library``. No ninja, no Python headers,
no network. The build takes about 20 seconds on a 2-core CPU, once per machine; a lock file
keeps two processes from building at once. Where it cannot be built (no compiler, another
BLAS than the torch wheel's MKL), the torch-ops kernels run instead: ``available()`` says
which, and ``ATTNMEM_NATIVE=0`` turns the native kernels off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("softcap.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    """``$ATTNMEM_CACHE``, else ``~/.cache/attnmem``; where that cannot be written (a read-only
    home), a folder of this user's in the system's temporary directory."""
    root = os.environ.get("ATTNMEM_CACHE")
    if root:
        return Path(root)
    home = Path(os.path.expanduser("~")) / ".cache" / "attnmem"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    import tempfile

    return Path(tempfile.gettempdir()) / f"attnmem-{os.getuid()}"


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def _command(cxx: str, src: Path, out: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DNDEBUG", "-w"]
    cmd += [f"-I{p}" for p in include_paths()]
    cmd += [str(src), "-o", str(out)]
    for p in library_paths():
        cmd += [f"-L{p}", f"-Wl,-rpath,{p}"]
    cmd += ["-lc10", "-ltorch_cpu", "-ltorch"]
    return cmd


def library_path() -> Path:
    """Where this source, torch and CPU's build lives (whether or not it exists yet)."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), _cpu_key().encode(), sys.version.encode()):
        h.update(part)
    return _cache_dir() / f"attnmem_native_{h.hexdigest()[:16]}.so"


def _build(out: Path) -> None:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp.so")
    log.info("attnmem: building the native softcap kernel (once per torch version and CPU): %s", out)
    print(f"attnmem: building the native softcap kernel once, into {out} (about 20 s)", file=sys.stderr)
    res = subprocess.run(_command(cxx, SOURCE, tmp), capture_output=True, text=True)
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {SOURCE.name} failed:\n{res.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: a concurrent process sees the whole library or none


def _load() -> bool:
    if os.environ.get("ATTNMEM_NATIVE", "1") == "0":
        _state["why"] = "ATTNMEM_NATIVE=0"
        return False
    try:
        out = library_path()
        if not out.exists():
            import fcntl

            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out.with_suffix(".lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it
                if not out.exists():
                    _build(out)
        torch.ops.load_library(str(out))
        _register_fakes()
    except Exception as e:  # no compiler, no MKL symbols, a failed build: the torch-ops kernels run
        _state["why"] = str(e)
        log.warning("attnmem: native kernels unavailable, the torch-ops kernels run instead: %s", e)
        return False
    _state["why"] = ""
    return True


def available() -> bool:
    """Whether the native kernels are loaded (building them on the first call)."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _load()
        return bool(_state["ok"])


def why_unavailable() -> str:
    """Why ``available()`` is False ("" when it is True or was not asked yet)."""
    return str(_state.get("why", ""))


def _register_fakes() -> None:
    """Shapes for tracing (``attnmem.estimate`` runs the code on fake tensors)."""

    @torch.library.register_fake("attnmem_native::softcap_fwd")
    def _fwd(q, k, v, scale, cap, left, right, offset, key_valid):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3])

    @torch.library.register_fake("attnmem_native::softcap_bwd")
    def _bwd(dout, q, k, v, out, lse, delta, scale, cap, left, right, offset, key_valid):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


NATIVE_DTYPES = (torch.float32, torch.float64)


def _flags(valid):
    return None if valid is None else valid.to(device="cpu", dtype=torch.bool).contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself where BLAS can read its rows (unit stride in D, rows at least D apart), else a copy."""
    return t if t.stride(-1) == 1 and t.stride(-2) >= t.shape[-1] else t.contiguous()


def softcap_forward(q, k, v, scale: float, cap: float, *, left: int | None = None, right: int | None = None,
                    key_valid=None):
    """(out, lse) of soft-capped attention: q (B, Hq, M, D), k, v (B, Hkv, N, D), float32/float64;
    out contiguous, lse (B, Hq, M), -inf on rows that attend to nothing. ``left``, ``right``:
    attnmem's window (``masks.SlidingWindow``: key j for row i iff -left <= j - (i + N - M) <=
    right; None is unbounded; causal is (None, 0), no mask (None, None)); ``key_valid``: (1 or B, N)
    bools of ``masks.key_padding``, or None."""
    return torch.ops.attnmem_native.softcap_fwd(q, _rows(k), _rows(v), float(scale), float(cap), left, right,
                                                k.shape[-2] - q.shape[-2], _flags(key_valid))


def softcap_backward(dout, q, k, v, out, lse, scale: float, cap: float, *, left: int | None = None,
                     right: int | None = None, key_valid=None, delta=None):
    """(dq, dk, dv), contiguous; ``lse`` +inf on rows that attend to nothing; ``delta`` (B, Hq, M)
    replaces rowsum(dO ∘ O). dO, O and q may have any strides (the kernel copies a block of rows
    at a time), k and v are copied here unless BLAS can read their rows."""
    return torch.ops.attnmem_native.softcap_bwd(dout, q, _rows(k), _rows(v), out, lse, delta, float(scale),
                                                float(cap), left, right, k.shape[-2] - q.shape[-2], _flags(key_valid))
