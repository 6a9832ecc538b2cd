"""The order ptxas gives the decode kernels' loads and their wait for the previous kernel, read
from the compiled code (SASS, through nvdisasm; no GPU needed).

Under programmatic dependent launch a kernel starts while the kernel before it still runs; what
it loads before its wait (griddepcontrol.wait, SASS `ACQBULK`) streams under that kernel. The
source's order is not the machine code's: moving a load below the wait is always legal, and
ptxas did so with 7 of the GEMV's 8 first-step weight loads (every B1 figure from the third
session to the eighteenth was measured that way). These tests hold the compiled order, and that nothing the previous
kernel writes is read before the wait.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import torch

from aserve.cuda import compiler
from aserve.cuda.gemv import DEEP_GEOMETRY, DEEP_ROWS, GEMV_MAX_ROWS, VARIANTS, gemv_options
from aserve.cuda.ops import paged_attention_options


def _nvdisasm():
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for candidate in sorted(pathlib.Path(root).glob("*/bin/nvdisasm")):
            return str(candidate)
    return None


NVDISASM = _nvdisasm()
pytestmark = [
    pytest.mark.skipif(not compiler.nvrtc_available(), reason='NVRTC is not installed (pip install "cuda-python[all]")'),
    pytest.mark.skipif(NVDISASM is None, reason="nvdisasm is not installed (pip install nvidia-cuda-nvdisasm)"),
]

WAIT = "ACQBULK"          # griddepcontrol.wait
WEIGHT_LOAD = "LDG.E.NA"  # gemv.cu's load_weight: ld.global.nc.L1::no_allocate


@pytest.fixture(autouse=True)
def fresh_cubin_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASERVE_CACHE_DIR", str(tmp_path))


def _sass(tmp_path, source: str, options: list[str], function: str) -> list[str]:
    """The instructions of `function` in source's sm_90 build, in address order."""
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiler.compile_cubin(source, options, 90))
    text = subprocess.run([NVDISASM, "-c", str(cubin)], check=True, capture_output=True, text=True).stdout
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith(".text."):
            inside = line.startswith(f".text.{function}:")
            continue
        if inside and "/*" in line and ";" in line:
            lines.append(line.split("*/", 1)[1].strip())
    assert lines, f"no instructions of {function} found"
    return lines


def _opcode(instruction: str) -> str:
    """"LDG.E.128" of "@!P0 LDG.E.128 R4, desc[UR4][R2.64] ;": the predicate left out."""
    words = instruction.split()
    return words[1] if words[0].startswith("@") else words[0]


def _is_coherent_load(instruction: str) -> bool:
    """A load of what an earlier kernel of the step may have written (not a weight's read-only load)."""
    opcode = _opcode(instruction)
    return opcode.startswith("LDG") and "CONSTANT" not in opcode


# Every row count at its geometry, and the rows that have a deep one (ASERVE_GEMV_DEEP) at it
# and at 2x6, the other deep geometry measured.
GEMV_BUILDS = ([(rows, None) for rows in range(1, GEMV_MAX_ROWS + 1)]
               + [(rows, geometry) for rows in DEEP_ROWS for geometry in (DEEP_GEOMETRY, (2, 6))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, geometry", GEMV_BUILDS,
                         ids=[f"rows{rows}" + (f"-{g[0]}x{g[1]}" if g else "") for rows, g in GEMV_BUILDS])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gemv_issues_its_first_steps_weight_loads_before_the_wait(tmp_path, dtype, rows, geometry, variant):
    options = gemv_options(dtype, rows, variant, geometry)
    defines = dict(option.removeprefix("-D").split("=") for option in options)
    step_loads = int(defines["UNROLL"]) * int(defines["WEIGHT_ROWS"])   # a lane's W loads of one step
    sass = _sass(tmp_path, "gemv.cu", options, "gemv")
    waits = [i for i, instruction in enumerate(sass) if WAIT in instruction]
    # waits[0]: warps without outputs, which wait and exit; waits[1]: the first full step's.
    assert len(waits) >= 2
    first_step = sass[waits[0] + 1:waits[1]]
    assert sum(WEIGHT_LOAD in instruction for instruction in first_step) == step_loads
    assert not any(_is_coherent_load(instruction) for instruction in sass[:waits[1]])


@pytest.mark.parametrize("dtype_id", [0, 1, 2])
@pytest.mark.parametrize("function", ["rms_norm_vec", "layer_norm_vec"])
def test_vector_norms_load_weights_before_the_wait_and_the_row_in_one_round_trip(tmp_path, dtype_id, function):
    sass = _sass(tmp_path, "layer_ops.cu", [f"-DDTYPE={dtype_id}"], function)
    wait = next(i for i, instruction in enumerate(sass) if WAIT in instruction)
    assert not any(_is_coherent_load(instruction) for instruction in sass[:wait])
    assert any("LDG" in instruction and "CONSTANT" in instruction for instruction in sass[:wait])   # the weight
    # Every load of the row (and residual) goes out before any arithmetic on them waits for one.
    row_loads = [i for i, instruction in enumerate(sass) if _is_coherent_load(instruction)]
    first_use = next(i for i, instruction in enumerate(sass)
                     if i > wait and _opcode(instruction).startswith(("FADD", "FMUL", "FFMA", "STG")))
    assert row_loads and max(row_loads) < first_use


def _first_wait(sass: list[str]) -> int:
    return next(i for i, instruction in enumerate(sass) if WAIT in instruction)


# Every kernel launched with pdl=True, as (source, -D options, function). A kernel may read step
# inputs before its wait only because none of these lets the next kernel start (PREEXIT), or
# ends a CTA (EXIT), before its own wait (common.cuh's wait_for_previous_kernel).
PDL_KERNELS = [
    *[("gemv.cu", gemv_options(torch.bfloat16, rows, variant, geometry), "gemv")
      for rows, geometry in ((1, None), (4, None), (1, DEEP_GEOMETRY)) for variant in VARIANTS],
    *[("layer_ops.cu", ["-DDTYPE=2"], name) for name in (
        "rms_norm_vec", "rms_norm", "layer_norm_vec", "layer_norm", "rotary_embedding",
        "rotary_embedding_cache_vec", "silu_and_mul_vec", "silu_and_mul")],
    ("cache_ops.cu", [], "reshape_and_cache"),
    ("sampling.cu", ["-DDTYPE=2"], "argmax_rows"),
    *[(source, paged_attention_options(torch.bfloat16, 128, 16, group, cluster), "paged_decode")
      for source, group in (("paged_attention.cu", 4), ("paged_attention_mma.cu", 8)) for cluster in (False, True)],
]


@pytest.mark.parametrize("source, options, function", PDL_KERNELS,
                         ids=[f"{f}-{s}-{i}" for i, (s, _, f) in enumerate(PDL_KERNELS)])
def test_no_kernel_lets_the_next_start_or_ends_before_its_wait(tmp_path, source, options, function):
    sass = _sass(tmp_path, source, options, function)
    wait = _first_wait(sass)
    assert not any(_opcode(instruction) in ("EXIT", "PREEXIT") for instruction in sass[:wait])


@pytest.mark.parametrize("dtype_id, vec", [(0, 4), (1, 8), (2, 8)])
def test_rotary_reads_position_slot_and_tables_before_the_wait(tmp_path, dtype_id, vec):
    sass = _sass(tmp_path, "layer_ops.cu", [f"-DDTYPE={dtype_id}"], "rotary_embedding_cache_vec")
    before = sass[:_first_wait(sass)]
    loads = [_opcode(instruction) for instruction in before if _opcode(instruction).startswith("LDG")]
    # The position and the slot (64-bit step inputs, through L2), and the thread's first
    # cos/sin values; the projection's query, key and value (16-byte loads) only after it.
    assert sorted(op for op in loads if "CONSTANT" not in op) == ["LDG.E.64.STRONG.GPU"] * 2
    assert sum("CONSTANT" in op for op in loads) == 2 * vec


@pytest.mark.parametrize("cluster", [False, True])
def test_paged_decode_copies_its_first_tile_before_the_wait(tmp_path, cluster):
    sass = _sass(tmp_path, "paged_attention.cu", paged_attention_options(torch.bfloat16, 128, 16, 4, cluster),
                 "paged_decode")
    first_copy = next(i for i, instruction in enumerate(sass) if _opcode(instruction).startswith("LDGSTS"))
    wait = next(i for i in range(first_copy, len(sass)) if WAIT in sass[i])
    before = sass[:wait]
    # A tile of 32 tokens: 4 of the thread's 16-byte keys and 4 values.
    assert sum(_opcode(instruction).startswith("LDGSTS") for instruction in before) == 8
    # Before it, only the sequence's length and block ids (32-bit); the query and the newest
    # key and value (16-byte loads) after it.
    assert {_opcode(instruction) for instruction in before if _opcode(instruction).startswith("LDG.")} == \
        {"LDG.E.STRONG.GPU"}
