"""Rank 0's handle on the other ranks: it starts the head node's workers, connects to them,
sends them each step, watches them, and ends them.

Workers are spawned processes (one per GPU of the head node, ranks 1..N-1 there); ranks on
other nodes are started by `python -m aserve --headless` there and reach rank 0 through the
store. A monitor thread waits on the local workers' pipes and process sentinels: a worker
that dies (or fails to load) makes the group failed at once, with the worker's traceback; the
group then aborts its collectives so that nothing blocked in one hangs, ends the other
workers, and tells its listeners (the server turns unhealthy and exits). Failures of remote
ranks surface as errors of the collectives and the plan broadcast instead.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import sys
import threading
import types
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

import torch

from aserve.config import EngineArgs, ModelConfig, ParallelConfig
from aserve.distributed.group import TensorParallelError, TensorParallelGroup
from aserve.executor.plan_channel import PlanSender
from aserve.distributed.rendezvous import connect, head_address, open_store, use_safe_collectives_env
from aserve.executor.shm_ring import ShmRing
from aserve.executor.worker_proc import WorkerSpec, worker_main
from aserve.worker.step_arrays import SHUTDOWN, StepArrays, control_message

logger = logging.getLogger(__name__)
T = TypeVar("T")

_JOIN_SECONDS = 10.0


class WorkerFailedError(TensorParallelError):
    """A worker rank died or failed; the message carries its exit code and traceback."""


@dataclass
class _Worker:
    rank: int
    process: multiprocessing.Process
    conn: multiprocessing.connection.Connection
    ready: bool = False
    traceback: Optional[str] = None
    info: dict = field(default_factory=dict)


class WorkerGroup:
    def __init__(self, args: EngineArgs, model_config: ModelConfig, parallel: ParallelConfig) -> None:
        use_safe_collectives_env()
        self.parallel = parallel
        host, port = head_address(parallel)
        self.store = open_store(host, port, is_head=True)
        local_ranks = list(parallel.node_ranks(0))[1:]
        self.ring = ShmRing.create(len(local_ranks)) if local_ranks else None
        self.group: Optional[TensorParallelGroup] = None
        self._sender: Optional[PlanSender] = None
        self._failure: Optional[WorkerFailedError] = None
        self._failed = threading.Event()
        self._closing = False
        self._listeners: list[Callable[[BaseException], None]] = []
        self._workers: dict[int, _Worker] = {}
        log_level = logging.getLogger("aserve").getEffectiveLevel()
        context = multiprocessing.get_context("spawn")
        with _without_user_main(), _ending_on_error(self):
            for index, rank in enumerate(local_ranks):
                receive, send = context.Pipe(duplex=False)
                spec = WorkerSpec(rank, args, model_config, host, self.store.port,
                                  self.ring.spec, index, log_level)
                # daemon: multiprocessing ends these at interpreter exit if nothing else did.
                process = context.Process(target=worker_main, args=(spec, send),
                                          name=f"aserve-tp-rank{rank}", daemon=True)
                process.start()
                send.close()
                self._workers[rank] = _Worker(rank, process, receive)
        logger.info("tensor parallelism: %d ranks over %d node(s); started ranks %s on this node "
                    "(pids %s)", parallel.world_size, parallel.nnodes, local_ranks,
                    [w.process.pid for w in self._workers.values()])
        self._finalizer = weakref.finalize(self, _end_processes,
                                           [w.process for w in self._workers.values()], self.ring)
        self._monitor = threading.Thread(target=self._watch, name="aserve-tp-monitor", daemon=True)
        self._monitor.start()

    # ------------------------------------------------------------------ start-up
    def connect(self, device: torch.device) -> TensorParallelGroup:
        """Rank 0 joins the process groups (every rank does this at once)."""
        self.group, plan_group = connect(self.parallel, 0, self.store, device)
        if self.ring is not None:  # every local worker mapped the ring before connecting
            self.ring.remove_name()
        self._sender = PlanSender(self.ring, plan_group, self.raise_if_failed)
        return self.group

    def run_guarded(self, fn: Callable[[], T]) -> T:
        """Run fn (rank 0's part of the start-up, which waits on the workers in collectives)
        in a thread, and give up on it, raising WorkerFailedError, as soon as a worker fails:
        a collective with a dead rank might otherwise wait for the whole timeout."""
        outcome: dict = {}

        def target() -> None:
            try:
                outcome["value"] = fn()
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=target, name="aserve-tp-startup", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            if self._failed.is_set():
                raise self._failure
        if "error" in outcome:
            failure = self.wait_for_failure(2.0)
            if failure is not None:
                raise failure from outcome["error"]
            raise outcome["error"]
        return outcome["value"]

    # ------------------------------------------------------------------ steps
    def send_step(self, kind: int, arrays: StepArrays) -> None:
        self._sender.send(arrays.pack(kind))

    # ------------------------------------------------------------------ failure
    @property
    def failure(self) -> Optional[WorkerFailedError]:
        return self._failure

    def raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure

    def wait_for_failure(self, timeout: float) -> Optional[WorkerFailedError]:
        """The workers' failure, waiting up to timeout for the monitor to see one (a
        collective may fail a moment before the dead worker's exit is noticed)."""
        if self._workers:
            self._failed.wait(timeout)
        return self._failure

    def add_failure_listener(self, listener: Callable[[BaseException], None]) -> None:
        """listener(error) is called (from the monitor thread) when a worker fails."""
        self._listeners.append(listener)
        if self._failure is not None:
            listener(self._failure)

    def _watch(self) -> None:
        waiting: dict = {}
        for worker in self._workers.values():
            waiting[worker.conn] = worker
            waiting[worker.process.sentinel] = worker
        while waiting and not self._closing:
            for handle in multiprocessing.connection.wait(list(waiting), timeout=0.5):
                worker = waiting[handle]
                if handle is worker.conn:
                    if not self._receive(worker):
                        del waiting[handle]
                    continue
                del waiting[handle]
                while worker.conn in waiting and worker.conn.poll() and self._receive(worker):
                    pass  # a traceback sent just before the exit
                if not self._closing and not sys.is_finalizing():
                    self._fail(worker)
                    return

    @staticmethod
    def _receive(worker: _Worker) -> bool:
        try:
            kind, payload = worker.conn.recv()
        except (EOFError, OSError):
            return False
        if kind == "ready":
            worker.ready, worker.info = True, payload
        elif kind == "error":
            worker.traceback = payload
        return True

    def _fail(self, worker: _Worker) -> None:
        process = worker.process
        process.join(1.0)
        message = (f"tensor-parallel worker rank {worker.rank} (pid {process.pid}) "
                   f"{'failed while starting' if not worker.ready else 'died'} with exit code "
                   f"{process.exitcode}")
        if worker.traceback:
            last = worker.traceback.strip().splitlines()[-1]
            message += f": {last}"
        self._failure = WorkerFailedError(message)
        logger.error("%s%s", message, f"\n{worker.traceback}" if worker.traceback else "")
        self._failed.set()
        if self.group is not None:
            self.group.abort()
        _end_processes([w.process for w in self._workers.values()], None)
        for listener in list(self._listeners):
            try:
                listener(self._failure)
            except Exception:
                logger.exception("a worker-failure listener failed")

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, graceful: bool = True) -> None:
        """Tell the workers to stop and wait for them (a bounded time), then end what is left.
        graceful=False ends them at once (a failed start-up: they may sit in a collective)."""
        if self._closing:
            return
        self._closing = True
        if graceful and self._failure is None and self._sender is not None:
            try:
                self._sender.send(control_message(SHUTDOWN))
            except Exception as exc:
                logger.warning("could not tell the workers to stop: %r", exc)
            for worker in self._workers.values():
                worker.process.join(_JOIN_SECONDS)
        _end_processes([w.process for w in self._workers.values()], self.ring)
        if self.group is not None:
            self.group.shutdown()
        self._finalizer.detach()


def _end_processes(processes: list, ring: Optional[ShmRing]) -> None:
    """Terminate, then kill, whatever is still running (also at exit, through weakref.finalize)."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)
    if ring is not None:
        ring.remove_name()


@contextlib.contextmanager
def _ending_on_error(group: "WorkerGroup"):
    """A start that fails halfway leaves no process and no ring behind."""
    try:
        yield
    except BaseException:
        _end_processes([w.process for w in group._workers.values()], group.ring)
        raise


@contextlib.contextmanager
def _without_user_main():
    """Start workers without re-running the user's script in them: spawn imports the parent's
    __main__ in each child, which in a script with no `if __name__ == "__main__":` guard would
    build another engine there. The workers' code lives in aserve, so they need none of it."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main
