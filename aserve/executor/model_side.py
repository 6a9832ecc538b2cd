"""The engine's model side at start-up: this process's ModelRunner (rank 0) and, under tensor
parallelism, the worker ranks, started and connected together."""

from __future__ import annotations

from typing import Optional

import torch

from aserve.config import EngineArgs, ModelConfig, ParallelConfig
from aserve.distributed.rendezvous import rank_device
from aserve.executor.worker_group import WorkerGroup
from aserve.worker.model_runner import ModelRunner
from aserve.worker.runner_setup import build_model_runner


def start_model_side(args: EngineArgs, model_config: ModelConfig, parallel_config: ParallelConfig,
                     device: torch.device) -> tuple[torch.device, ModelRunner, Optional[WorkerGroup]]:
    """(rank 0's device, its runner, the worker group or None). Rank 0 builds its part while
    the workers build theirs: the start-up's collectives need every rank. A failed start ends
    the workers it started."""
    if parallel_config.world_size == 1:
        return device, build_model_runner(args, model_config, device), None
    device = rank_device(parallel_config, 0, device.type)
    workers = WorkerGroup(args, model_config, parallel_config)

    def build_rank0_runner() -> ModelRunner:
        if device.type == "cuda":
            torch.cuda.set_device(device)   # this runs in a start-up thread
        return build_model_runner(args, model_config, device, workers.connect(device))

    try:
        runner = workers.run_guarded(build_rank0_runner)
    except BaseException:
        workers.shutdown(graceful=False)
        raise
    runner.send_step = workers.send_step
    return device, runner, workers
