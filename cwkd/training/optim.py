"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math

import torch
from torch import nn

from cwkd.training.config import TrainConfig


def build_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW; no weight decay on biases and norm weights."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in module.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer.value == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Linear warmup, then cosine decay to zero, stepped every optimizer step."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
