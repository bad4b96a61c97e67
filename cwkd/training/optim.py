"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cwkd.choices import Precision
from cwkd.training.config import TrainConfig


@dataclass
class Stepper:
    """What steps a run's weights: the optimizer, its learning-rate schedule and the loss scaler (fp16 only)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    @classmethod
    def build(cls, module: nn.Module, cfg: TrainConfig, steps_per_epoch: int, device: torch.device) -> Stepper:
        """A fresh optimizer over ``module``'s parameters, its schedule over ``cfg.epochs``, and the scaler."""
        optimizer = build_optimizer(module, cfg)
        return cls(optimizer, build_scheduler(optimizer, cfg, steps_per_epoch),
                   torch.amp.GradScaler(device.type, enabled=cfg.precision is Precision.fp16))


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
