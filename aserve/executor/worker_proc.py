"""A worker rank's whole life, in its own process: connect, build its shard, then run every
step rank 0 sends until told to stop.

A worker holds tensors and a ModelRunner, nothing else: no scheduler, no block manager, no
tokenizer. Everything it does is decided on rank 0 and arrives as the step's packed arrays.
It tells its parent, through a pipe, when it is ready and, if it fails, its traceback (which
the head then logs and puts in its error); it exits when its parent dies, even from inside a
collective that will never finish.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import Optional

from aserve.config import EngineArgs, ModelConfig

logger = logging.getLogger("aserve.worker")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, pickled once when it is spawned."""

    rank: int
    args: EngineArgs
    model_config: Optional[ModelConfig]   # None: resolve it from args (a node away from the head)
    store_host: str
    store_port: int
    ring_spec: Optional[tuple]            # the head node's ranks read the shared-memory ring
    reader_index: int
    log_level: int


def worker_main(spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    """The spawned process's entry point."""
    # Ctrl-C in a terminal reaches every process of the group; the head decides what happens.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    _configure_logging(spec.rank, spec.log_level)
    try:
        _serve(spec, conn)
    except BaseException:
        text = traceback.format_exc()
        logger.error("tensor-parallel worker rank %d failed:\n%s", spec.rank, text)
        try:
            conn.send(("error", text))
        except Exception:
            pass
        _flush_and_exit(1)
    _flush_and_exit(0)


def _serve(spec: WorkerSpec, conn) -> None:
    import torch

    from aserve.executor.plan_channel import PlanReceiver
    from aserve.distributed.rendezvous import connect, open_store, rank_device, use_safe_collectives_env
    from aserve.executor.shm_ring import ShmRing
    from aserve.models.loader import create_model_config
    from aserve.worker.runner_setup import build_model_runner
    from aserve.worker.step_arrays import SHUTDOWN, STEP_DRY_RUN, StepArrays

    use_safe_collectives_env()
    args = spec.args
    parallel = args.parallel_config()
    device = rank_device(parallel, spec.rank, args.resolve_device().type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the node's cores are shared by its ranks
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // parallel.ranks_per_node))
    model_config = spec.model_config or create_model_config(args)
    ring = (ShmRing.attach(*spec.ring_spec, reader=spec.reader_index)
            if spec.ring_spec is not None else None)
    store = open_store(spec.store_host, spec.store_port, is_head=False)
    group, plan_group = connect(parallel, spec.rank, store, device)
    runner = build_model_runner(args, model_config, device, group)
    receiver = PlanReceiver(ring, plan_group)
    conn.send(("ready", {"rank": spec.rank, "pid": os.getpid(), "num_blocks": runner.num_blocks}))
    logger.debug("rank %d ready on %s", spec.rank, device)
    while True:
        kind, arrays = StepArrays.unpack(receiver.receive())
        if kind == SHUTDOWN:
            break
        if kind == STEP_DRY_RUN:
            continue
        runner.worker_step(kind, runner.model_input(arrays))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    group.shutdown()
    if ring is not None:
        ring.close()


def _exit_with_parent() -> None:
    """A daemon thread that ends this process when its parent is gone (killed, crashed): a
    worker must never outlive the engine, even while blocked inside a collective."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="aserve-parent-watch", daemon=True).start()


def _configure_logging(rank: int, level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s (rank {rank}) %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root = logging.getLogger("aserve")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _flush_and_exit(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: the interpreter's exit would wait for threads a collective may still hold.
    os._exit(code)
