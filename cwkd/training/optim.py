"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math
import warnings
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

    def step(self, loss: torch.Tensor, module: nn.Module, clip_grad: float | None = None) -> None:
        """Backward, clip ``module``'s gradients to norm ``clip_grad`` (when given), optimizer and schedule step."""
        self.scaler.scale(loss).backward()
        if clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(module.parameters(), clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if not self.scaler.is_enabled():
            self.scheduler.step()
            return
        with warnings.catch_warnings():  # fp16 skips the steps whose gradients overflowed: the schedule goes on
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()


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
