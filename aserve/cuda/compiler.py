"""Aserve's CUDA C kernels, loaded and launched through the driver API on torch's current stream.

A kernel source (a .cu file in this folder) plus its -D options is compiled once per GPU
architecture into a CUBIN for that exact sm_XX (cubins.py: NVRTC, the disk cache, the builds
compiled ahead); never PTX, since a newer NVRTC's PTX cannot be JIT-compiled by an older
driver, while a cubin of any 13.x toolkit loads. Here each build is loaded once per process
(load_module), its kernels found, and launched. Every driver call is checked.

Programmatic dependent launch (Hopper and newer): a kernel launched with pdl=True may start
while the kernel before it in the stream is still running, and must call
wait_for_previous_kernel() (common.cuh) before it reads anything that kernel writes or writes
anything it reads, and read what earlier kernels wrote with coherent loads (load_fresh), never
the non-coherent path (__ldg), whose data must stay unwritten for the whole kernel. A decode
step at batch 1 is a chain of ~300 short kernels; without this, each one's launch and ramp-up
waits for the previous one to drain, and the GEMVs cannot start streaming their weights early.
ASERVE_PDL=0 turns it off (to measure it, or to rule it out).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from typing import Sequence

import torch

# The build side, named here too: callers (and tests) reach the whole kernel API through this module.
from aserve.cuda.cubins import (KernelCompileError, _compile, compile_ahead, compile_cubin,  # noqa: F401
                                cubin_for, nvrtc_available, nvrtc_version)

logger = logging.getLogger(__name__)


class SetUpDuringCapture(RuntimeError):
    """A kernel's one-time set-up (compiling or loading its module, raising one of its
    attributes, asking its cluster limit, growing a buffer it keeps) was reached while a CUDA
    graph was being captured. Set-up is host work or a fill that a capture records without
    running, so it is refused there: run the same step once eagerly first
    (worker/cuda_graphs.py does, then captures again)."""


def refuse_set_up_during_capture(what: str) -> None:
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise SetUpDuringCapture(f"{what} was reached during CUDA graph capture; run the step eagerly first")


# ------------------------------------------------------------------------------ driver side
def _driver():
    from cuda.bindings import driver

    return driver


def _check_cu(result, what: str):
    driver = _driver()
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise RuntimeError(f"CUDA driver call {what} failed: {name.decode() if name else err}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def _ensure_context(device_index: int) -> None:
    """Make the device's primary context (the one torch uses) current on this thread: driver
    calls from a thread where torch has not yet run anything would otherwise find none."""
    torch.cuda.init()
    driver = _driver()
    current = _check_cu(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    if current is not None and int(current) != 0:
        return
    device = _check_cu(driver.cuDeviceGet(device_index), "cuDeviceGet")
    context = _check_cu(driver.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")
    _check_cu(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")


@functools.lru_cache(maxsize=None)
def capability(device_index: int) -> tuple[int, int]:
    """The GPU's compute capability, e.g. (9, 0) for Hopper (asked once per device)."""
    return torch.cuda.get_device_capability(device_index)


def env_switch(name: str, default: str) -> bool:
    """An on/off setting of the environment: "1" on, "0" off, anything else a ValueError."""
    choice = os.environ.get(name, default)
    if choice not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {choice!r}")
    return choice == "1"


PDL_ENV = "ASERVE_PDL"


def pdl_enabled(device_index: int) -> bool:
    """Whether launches asking for programmatic dependent launch get it on this GPU: it needs
    compute capability 9.0 (Hopper) or newer."""
    return env_switch(PDL_ENV, "1") and capability(device_index) >= (9, 0)


def _pdl_attribute():
    driver = _driver()
    attribute = driver.CUlaunchAttribute()
    attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attribute.value.programmaticStreamSerializationAllowed = 1
    return attribute


def _cluster_attribute(cluster_z: int):
    """Thread block clusters of 1 x 1 x cluster_z CTAs (Hopper and newer)."""
    driver = _driver()
    attribute = driver.CUlaunchAttribute()
    attribute.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    attribute.value.clusterDim.x, attribute.value.clusterDim.y, attribute.value.clusterDim.z = 1, 1, cluster_z
    return attribute


@functools.lru_cache(maxsize=None)
def _launch_attributes(pdl: bool, cluster_z: int) -> list:
    return ([_pdl_attribute()] if pdl else []) + ([_cluster_attribute(cluster_z)] if cluster_z > 1 else [])


# The most CTAs one cluster may hold without the non-portable opt-in.
PORTABLE_CLUSTER = 8


class Kernel:
    """One loaded kernel function; launch() runs it on torch's current stream."""

    def __init__(self, module: "LoadedModule", name: str, function) -> None:
        self.module = module  # keeps the CUmodule alive as long as the function is used
        self.name = name
        self.function = function
        self._dynamic_shared_limit = 0  # what cuFuncSetAttribute allowed so far (0: the default)
        self._non_portable_clusters = False
        self._cluster_limits: dict[tuple, int] = {}
        self._resident: dict[tuple, int] = {}

    def _allow_dynamic_shared(self, nbytes: int) -> None:
        """A launch with more than the default 48 KB of shared memory (static plus dynamic) needs
        the kernel's opt-in limit raised first; raised once per larger size."""
        if nbytes <= self._dynamic_shared_limit:
            return
        refuse_set_up_during_capture(f"raising {self.name}'s shared memory limit")
        driver = _driver()
        _check_cu(driver.cuFuncSetAttribute(
            self.function, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes),
            f"cuFuncSetAttribute({self.name}, max dynamic shared memory {nbytes})")
        self._dynamic_shared_limit = nbytes

    def _allow_non_portable_clusters(self) -> None:
        """Clusters beyond PORTABLE_CLUSTER CTAs (16 on an H100 or H200) need an opt-in."""
        if self._non_portable_clusters:
            return
        refuse_set_up_during_capture(f"allowing {self.name} non-portable clusters")
        driver = _driver()
        _check_cu(driver.cuFuncSetAttribute(
            self.function, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1),
            f"cuFuncSetAttribute({self.name}, non-portable cluster size)")
        self._non_portable_clusters = True

    def max_cluster_size(self, block: tuple[int, int, int], shared_mem: int) -> int:
        """The most CTAs one thread block cluster of this kernel may hold on its GPU (Hopper and
        newer), for CTAs of this shape: 16 on an H100 or H200, less where a GPU's processor
        clusters are smaller or the CTAs too big."""
        key = (block, shared_mem)
        if key not in self._cluster_limits:
            refuse_set_up_during_capture(f"asking {self.name}'s cluster limit")
            driver = _driver()
            if shared_mem:
                self._allow_dynamic_shared(shared_mem)
            self._allow_non_portable_clusters()
            config = driver.CUlaunchConfig()
            config.gridDimX, config.gridDimY, config.gridDimZ = 1, 1, 16
            config.blockDimX, config.blockDimY, config.blockDimZ = block
            config.sharedMemBytes = shared_mem
            err, size = driver.cuOccupancyMaxPotentialClusterSize(self.function, config)
            if err != driver.CUresult.CUDA_SUCCESS:
                # Every GPU with clusters holds the portable size: fall back to it, not to failing.
                logger.warning("cuOccupancyMaxPotentialClusterSize(%s) failed (%s): clusters of at most %d CTAs",
                               self.name, err, PORTABLE_CLUSTER)
                size = PORTABLE_CLUSTER
            self._cluster_limits[key] = int(size)
        return self._cluster_limits[key]

    def max_active_ctas_per_sm(self, threads: int, shared_mem: int = 0) -> int:
        """How many CTAs of `threads` threads (and shared_mem bytes of dynamic shared memory) one
        SM holds at once, by the kernel's registers and shared memory: its grid's first wave is
        this times the SM count."""
        key = (threads, shared_mem)
        if key not in self._resident:
            driver = _driver()
            self._resident[key] = int(_check_cu(
                driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(self.function, threads, shared_mem),
                f"cuOccupancyMaxActiveBlocksPerMultiprocessor({self.name})"))
        return self._resident[key]

    def launch(self, grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int,
               args: Sequence, arg_types: Sequence, stream: int, pdl: bool = False, cluster_z: int = 1) -> None:
        """args: ints for pointers/integers, floats; arg_types: the matching ctypes types.
        shared_mem: bytes of dynamic shared memory (the kernel's limit is raised as needed).
        pdl: the kernel calls wait_for_previous_kernel() before touching anything the previous
        kernel may touch, so it may be launched while that kernel runs (see the module's doc).
        cluster_z: CTAs per thread block cluster along grid.z (which it must divide); 1: none."""
        driver = _driver()
        if shared_mem:
            self._allow_dynamic_shared(shared_mem)
        if cluster_z > PORTABLE_CLUSTER:
            self._allow_non_portable_clusters()
        params = (tuple(args), tuple(arg_types))
        pdl = pdl and pdl_enabled(self.module.device_index)
        if not pdl and cluster_z == 1:
            _check_cu(driver.cuLaunchKernel(self.function, *grid, *block, shared_mem, stream, params, 0),
                      f"cuLaunchKernel({self.name})")
            return
        config = driver.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = grid
        config.blockDimX, config.blockDimY, config.blockDimZ = block
        config.sharedMemBytes = shared_mem
        config.hStream = stream
        config.attrs = _launch_attributes(pdl, cluster_z)
        config.numAttrs = len(config.attrs)
        _check_cu(driver.cuLaunchKernelEx(config, self.function, params, 0),
                  f"cuLaunchKernelEx({self.name})")


class LoadedModule:
    def __init__(self, cubin: bytes, device_index: int) -> None:
        _ensure_context(device_index)
        self.device_index = device_index
        self.handle = _check_cu(_driver().cuModuleLoadData(cubin), "cuModuleLoadData")
        self._kernels: dict[str, Kernel] = {}

    def kernel(self, name: str) -> Kernel:
        found = self._kernels.get(name)
        if found is None:
            refuse_set_up_during_capture(f"finding kernel {name}")
            function = _check_cu(_driver().cuModuleGetFunction(self.handle, name.encode()),
                                 f"cuModuleGetFunction({name})")
            found = self._kernels[name] = Kernel(self, name, function)
        return found


_modules: dict[tuple, LoadedModule] = {}
_lock = threading.Lock()


def load_module(source_name: str, options: Sequence[str], device_index: int) -> LoadedModule:
    """The module of source_name compiled with options for the GPU device_index, compiled
    (or read from the disk cache) and loaded once per process."""
    key = (source_name, tuple(options), device_index)
    module = _modules.get(key)
    if module is None:
        refuse_set_up_during_capture(f"loading {source_name} {' '.join(options)}")
        with _lock:
            module = _modules.get(key)
        if module is None:
            major, minor = capability(device_index)
            # Outside the lock: compile_ahead's bookkeeping takes it, and a wait here may be long.
            cubin = cubin_for(source_name, options, major * 10 + minor)
            with _lock:
                module = _modules.get(key)
                if module is None:
                    module = _modules[key] = LoadedModule(cubin, device_index)
    return module


# ctypes types for Kernel.launch argument lists.
POINTER, INT, INT64, FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float
# The dtypes the kernels take, with their -DDTYPE values (common.cuh).
KERNEL_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def device_index(tensor: torch.Tensor) -> int:
    return tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of the GPU device_index: launchers size grids by it."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def current_stream(tensor: torch.Tensor) -> int:
    """The handle of torch's current stream on the tensor's device (graph capture included)."""
    return torch.cuda.current_stream(tensor.device).cuda_stream
