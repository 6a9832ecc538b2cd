"""Kernel builds as cubins: NVRTC compiles aserve/cuda/<source> with -D options for one exact
sm_XX, a disk cache keeps each cubin, and compile_ahead starts many builds at once in worker
threads (compiler.load_module then waits for its build rather than compiling it twice).

Cubins are cached in ~/.cache/aserve/cubins (ASERVE_CACHE_DIR overrides the root), named by a
hash of the sources, the options, the architecture and NVRTC's version; a compile error names
the kernel file and carries NVRTC's log. Nothing here needs a GPU.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

_SOURCE_DIR = Path(__file__).parent
# Headers every kernel may #include, handed to NVRTC by name (no include path is needed).
_HEADERS = ("common.cuh", "cluster.cuh", "decode_common.cuh")


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message holds NVRTC's log."""


def _cache_dir() -> Path:
    root = os.environ.get("ASERVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "aserve")
    return Path(root) / "cubins"


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError("aserve's CUDA kernels need cuda-python with NVRTC: "
                          'pip install "cuda-python[all]"') from e
    return nvrtc


def _check_nvrtc(result, what: str):
    nvrtc = _nvrtc()
    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC {what} failed: {err.name}")
    return rest[0] if len(rest) == 1 else rest


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> tuple[int, int]:
    return tuple(_check_nvrtc(_nvrtc().nvrtcVersion(), "nvrtcVersion"))


def nvrtc_available() -> bool:
    """Whether NVRTC loads here: the kernels then compile, with or without a GPU to run them."""
    try:
        nvrtc_version()
        return True
    except Exception:
        return False


def _read_sources(source_name: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    source = (_SOURCE_DIR / source_name).read_bytes()
    headers = [(name.encode(), (_SOURCE_DIR / name).read_bytes()) for name in _HEADERS]
    return source, headers


def _full_options(options: Sequence[str], arch: int) -> list[str]:
    return [f"--gpu-architecture=sm_{arch}", "-std=c++17", "-default-device", *options]


def _cubin_path(source_name: str, options: Sequence[str], arch: int) -> Path:
    """Where a build's cubin is cached: named by a hash of the sources, the options, the
    architecture and NVRTC's version."""
    source, headers = _read_sources(source_name)
    digest = hashlib.sha256()
    for part in (source, *(h for _, h in headers), repr(_full_options(options, arch)).encode(),
                 repr(nvrtc_version()).encode()):
        digest.update(part)
        digest.update(b"\0")
    return _cache_dir() / f"{Path(source_name).stem}-sm{arch}-{digest.hexdigest()[:24]}.cubin"


def compile_cubin(source_name: str, options: Sequence[str], arch: int) -> bytes:
    """The CUBIN of aserve/cuda/<source_name> for sm_<arch> (e.g. 90), compiled with the -D
    options given, from the disk cache when it was compiled before. Needs no GPU."""
    path = _cubin_path(source_name, options, arch)
    if path.is_file():
        return path.read_bytes()
    source, headers = _read_sources(source_name)
    cubin = _compile(source_name, source, headers, _full_options(options, arch))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written whole under a temporary name, then renamed: concurrent processes never read half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(cubin)
    os.replace(tmp, path)
    return cubin


def _compile(source_name: str, source: bytes, headers, options: list[str]) -> bytes:
    nvrtc = _nvrtc()
    prog = _check_nvrtc(nvrtc.nvrtcCreateProgram(
        source, source_name.encode(), len(headers), [h for _, h in headers], [n for n, _ in headers]),
        "nvrtcCreateProgram")
    try:
        err, = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = _check_nvrtc(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            _check_nvrtc(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            raise KernelCompileError(
                f"NVRTC could not compile aserve/cuda/{source_name} with options {' '.join(options)}:\n"
                f"{log.decode(errors='replace').rstrip(chr(0))}")
        size = _check_nvrtc(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check_nvrtc(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# Builds being compiled ahead (compile_ahead), by (source, options, arch): a load of one of them
# waits for its worker instead of compiling it a second time.
_ahead: dict[tuple, concurrent.futures.Future] = {}
_ahead_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
_ahead_lock = threading.Lock()
# Worker threads at most: NVRTC releases the GIL while it compiles, so they run in parallel.
_AHEAD_THREADS = 8


def compile_ahead(builds: Sequence[tuple[str, Sequence[str]]], arch: int) -> int:
    """Start compiling these (source, options) builds for sm_<arch> in worker threads, into the
    disk cache, and return how many were started (those not cached already). A first start on a
    machine compiles ~20 builds one after another as the warm-up reaches them (7.7 s of model B's
    11.5 s on an H200 host); started together while the weights load, they compile in
    parallel. A build that fails here is only logged: its load compiles it again and raises
    there, where it is needed."""
    global _ahead_pool
    started = 0
    with _ahead_lock:
        for source_name, options in builds:
            key = (source_name, tuple(options), arch)
            if key in _ahead or _cubin_path(source_name, options, arch).is_file():
                continue
            if _ahead_pool is None:
                workers = min(_AHEAD_THREADS, len(os.sched_getaffinity(0)))
                _ahead_pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="aserve-nvrtc")
            future = _ahead_pool.submit(compile_cubin, source_name, options, arch)
            future.add_done_callback(functools.partial(_log_ahead_failure, key))
            _ahead[key] = future
            started += 1
    return started


def _log_ahead_failure(key: tuple, future: concurrent.futures.Future) -> None:
    if future.exception() is not None:
        logger.debug("compiling %s ahead failed: %s", key, future.exception())


def cubin_for(source_name: str, options: Sequence[str], arch: int) -> bytes:
    """The cubin of a build: from its compile ahead where one was started (waiting for it),
    else compile_cubin's (the disk cache, or NVRTC now)."""
    future = _ahead.get((source_name, tuple(options), arch))
    if future is not None:
        try:
            return future.result()
        except KernelCompileError:
            pass   # compiled again below, so the error is raised from the load that needs it
    return compile_cubin(source_name, options, arch)
