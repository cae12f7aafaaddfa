"""The training recipe: its config, the learning-rate schedule, the optimizer step, autocast. The rest of
training RAM / RAM++ from the engine's export Parquet: the rows (``model/data.py``), the objective
(``model/objective.py``), metrics (``model/metrics.py``) and the one loop (``model/loop.py``).

Losses: ASL on the tagging logits (γ−=7, γ+=0, clip 0.05, summed, as RAM); optional L1 distillation of
the pooled image embedding towards a teacher's (CLIP image features in RAM); for RAM++ an image–text
alignment term (ASL γ−=4 over image·caption similarities, the matching caption as the positive).
AdamW, linear warm-up then cosine decay, bf16 autocast on CUDA. Checkpoints keep the official layout
(``{'model': state_dict}`` plus optimizer, scheduler and step) so official tools load ours, and a run
resumes from its last checkpoint. When the model has RAM's caption branch, the image-tag-text
generation loss is added (``caption_weight``): each step picks one caption per image (seeded) and that
caption's own parse tags, as the official data loader does, with the prompt masking done right
(``model/caption.py`` says how).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    distill_weight: float = 0.0
    align_weight: float = 0.0
    seed: int = 0
    num_workers: int = 0
    save_every_epochs: int = 1
    loss: str = "asl"  # asl (RAM's) | bce
    hflip: bool = False  # flip half of each batch left-right (tags do not depend on left and right)
    caption_weight: float = 1.0  # image-tag-text generation loss, when the model has RAM's caption branch
    # weights and batches channels-last: convolutions run faster on CPU (bench/cnn_train.py measures it),
    # but the float sums differ, so the trained model (and what later steps decide) differs a little too
    channels_last: bool = False
    bf16: bool = True  # bf16 autocast on CUDA
    cpu_bf16: bool = False  # bf16 autocast on a CPU too (its AMX / AVX512-BF16 units; numerically another run)
    grad_clip: float | None = None  # clip the global gradient norm to this before each optimizer step
    # images per optimizer step over all workers; a multiple of batch_size x workers, reached by
    # accumulating gradients over several batches (None: one batch per step)
    global_batch_size: int | None = None
    # batches each loader worker decodes ahead (num_workers > 0). Loader workers change nothing trained:
    # each epoch's order and each batch's draws come from their own seeds, not from how far a loader runs
    # ahead (tests/test_train.py: test_loader_workers_decode_the_same_batches)
    prefetch_factor: int = 2


def lr_lambda(cfg: TrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(device: torch.device, cfg: TrainConfig | None = None):
    """bf16 autocast on CUDA (unless ``cfg.bf16`` is off), on a CPU only when ``cfg.cpu_bf16`` asks; nothing
    elsewhere (any device type, ``meta`` included, works)."""
    if device.type == "cuda" and (cfg is None or cfg.bf16):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and cfg is not None and cfg.cpu_bf16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def accumulation_steps(cfg: TrainConfig, workers: int = 1) -> int:
    """Batches per optimizer step so that one step sees ``global_batch_size`` images over all workers."""
    if cfg.global_batch_size is None:
        return 1
    per_step = cfg.batch_size * workers
    if cfg.global_batch_size % per_step:
        raise ValueError(f"global_batch_size {cfg.global_batch_size} is not a multiple of batch_size x workers "
                         f"= {cfg.batch_size} x {workers}")
    return cfg.global_batch_size // per_step


def optimizer_step(opt, sched, params, cfg: TrainConfig) -> None:
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    sched.step()
