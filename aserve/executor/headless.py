"""`python -m aserve --headless`: a node away from the head, which only runs its ranks.

It starts one worker process per rank of its node (rank = node_rank * ranks_per_node + local
rank), which reach the head through its store (master_addr:master_port) and then run every
step the head sends. It returns when they end: 0 when the head shut them down, 1 when one
failed (the others are then ended too). SIGINT and SIGTERM end the node's ranks.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading

from aserve.config import EngineArgs
from aserve.distributed.rendezvous import use_safe_collectives_env
from aserve.executor.worker_proc import WorkerSpec, worker_main
from aserve.executor.worker_group import _end_processes, _without_user_main
from aserve.models.loader import check_tensor_parallel_split, create_model_config

logger = logging.getLogger("aserve.headless")


def run_headless(args: EngineArgs) -> int:
    """Run this node's ranks until they end; the process's exit status."""
    parallel = args.parallel_config()
    if parallel.node_rank == 0:
        raise ValueError("--headless is for the other nodes (node_rank >= 1); the head node "
                         "(node_rank 0) runs the server itself.")
    use_safe_collectives_env()
    model_config = create_model_config(args)   # here, before any rank starts: a bad model fails fast
    check_tensor_parallel_split(model_config, parallel.world_size)
    context = multiprocessing.get_context("spawn")
    processes, pipes = [], []
    level = logging.getLogger("aserve").getEffectiveLevel()
    with _without_user_main():
        for rank in parallel.node_ranks():
            receive, send = context.Pipe(duplex=False)
            spec = WorkerSpec(rank, args, model_config, parallel.master_addr, parallel.master_port,
                              None, 0, level)
            process = context.Process(target=worker_main, args=(spec, send),
                                      name=f"aserve-tp-rank{rank}", daemon=True)
            process.start()
            send.close()
            processes.append(process)
            pipes.append(receive)
    logger.info("node %d of %d: started ranks %s (pids %s); waiting for the head at %s:%d",
                parallel.node_rank, parallel.nnodes, list(parallel.node_ranks()),
                [p.pid for p in processes], parallel.master_addr, parallel.master_port)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _wait(processes, pipes, stop)
    finally:
        _end_processes(processes, None)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(processes, pipes, stop: threading.Event) -> int:
    running = {p.sentinel: p for p in processes}
    while running:
        if stop.is_set():
            logger.info("stopping this node's ranks")
            return 0
        for sentinel in multiprocessing.connection.wait(list(running), timeout=0.2):
            process = running.pop(sentinel)
            process.join()
            if process.exitcode != 0:
                logger.error("%s exited with code %s; ending this node's other ranks", process.name,
                             process.exitcode)
                return 1
    for pipe in pipes:
        pipe.close()
    logger.info("the head ended this node's ranks")
    return 0
