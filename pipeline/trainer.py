"""The one Ray Train adapter: a per-worker training loop run as a ``TorchTrainer`` job.

Like ``executor.py`` for Ray Data, this is the only place the engine builds Ray Train objects; the loop
it runs (``model/distributed.py``) knows only ``ray.train.report`` / ``get_checkpoint`` / ``get_context``.
The run's storage is a folder of the step (shared storage on a cluster, as the run directory must be):
each checkpoint the loop reports lands there, and a new job with the same ``storage_path`` and ``name``
resumes from the latest one (Ray Train V2's job-level restore); a worker that dies inside a job is
restarted from it up to ``max_failures`` times.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.config import RayConfig


@dataclass(frozen=True)
class TrainJob:
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    storage_path: str = ""
    name: str = "train"
    max_failures: int = 2
    keep_checkpoints: int = 2


def run_torch_job(loop: Callable[[dict], Any], config: dict, job: TrainJob, ray_cfg: RayConfig | None = None,
                  run_dir: str | Path | None = None):
    """Run ``loop(config)`` on ``job.workers`` workers (DDP process group: NCCL on GPUs, gloo on CPUs).
    Returns Ray Train's ``Result`` (``return_value``: what rank 0's loop returned; ``checkpoint``: the
    latest reported). Runs on the Ray this process has joined (the runner's, started from the run's
    ``ray:`` block); when there is none, starts or joins one as the runner would from ``ray_cfg`` (its
    ``address``, or a local Ray of ``num_cpus`` with its temp dir under ``run_dir``) and stops it after."""
    import ray

    from pipeline.executor import start_ray

    started = start_ray(ray_cfg or RayConfig(progress=False), Path(run_dir or job.storage_path))
    try:
        return _trainer(loop, config, job).fit()
    finally:
        if started:
            ray.shutdown()


def _trainer(loop: Callable[[dict], Any], config: dict, job: TrainJob):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    Path(job.storage_path).mkdir(parents=True, exist_ok=True)
    return TorchTrainer(
        loop, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.use_gpu,
                                     resources_per_worker={"CPU": job.cpus_per_worker,
                                                           **({"GPU": 1} if job.use_gpu else {})}),
        run_config=RunConfig(name=job.name, storage_path=job.storage_path,
                             failure_config=FailureConfig(max_failures=job.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=job.keep_checkpoints)))
