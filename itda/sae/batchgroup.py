"""The ranks one SAE training batch is split over (torchrun data parallelism), as the losses see them.

Each rank holds a shard of the global batch. The batch-wide quantities of a step (the mean row, the
total variance, the BatchTopK cut, the smallest kept activation, which latents fired) are reduced over
the ranks, so every rank's loss is its part of the global batch's loss: the summed gradients are the
gradients of a single process on the whole batch. With one process (`SINGLE`) every reduction is the
identity and the formulas are those of the single-process code, bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


class BatchGroup:
    """Reductions over the ranks of a training batch; exchange: an itda.builder.distributed.Exchange or None."""

    def __init__(self, exchange=None):
        self.exchange: Any = exchange  # only used when distributed (then not None)
        self.rank = exchange.rank if exchange is not None else 0
        self.world = exchange.world if exchange is not None else 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def sum(self, t: Tensor) -> Tensor:
        """t summed over ranks (a detached copy; t itself when alone)."""
        if not self.distributed:
            return t
        return self.exchange.reduce_(t.detach().clone())

    def rows(self, n: int) -> int:
        """The global batch's row count from this rank's n (the shards are equal: itda.sae.run.rank_batch_size)."""
        return n * self.world

    def mean_rows(self, x_BD: Tensor) -> Tensor:
        """The global batch's mean row (x.mean(0) when alone)."""
        if not self.distributed:
            return x_BD.mean(0)
        return self.sum(x_BD.detach().sum(0)) / self.rows(x_BD.shape[0])

    def min_value(self, value: float | None) -> float | None:
        """The smallest of the ranks' values (None: a rank without one); None when no rank has one."""
        if not self.distributed:
            return value
        t = torch.tensor([math.inf if value is None else value], dtype=torch.float64)
        low = float(self.exchange.reduce_(t, op="min"))
        return None if low == math.inf else low

    def any_(self, mask: Tensor) -> Tensor:
        """A boolean mask true where it is true on any rank."""
        if not self.distributed:
            return mask
        return self.exchange.reduce_(mask.to(torch.int32), op="max").to(torch.bool)

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Every rank's rows concatenated in rank order (rows itself when alone)."""
        return rows if not self.distributed else self.exchange.gather_rows(rows)

    def sum_grads_(self, params) -> None:
        """Sum every parameter's gradient over the ranks, in place."""
        if self.distributed:
            for p in params:
                if p.grad is not None:
                    self.exchange.reduce_(p.grad)

    @torch.no_grad()
    def broadcast_(self, tensors) -> None:
        """Give every rank rank 0's values of these tensors, in place."""
        if self.distributed:
            for t in tensors:
                self.exchange.broadcast_(t)


SINGLE = BatchGroup()


def training_group(device) -> BatchGroup:
    """The ranks of this run: every rank of torchrun (WORLD_SIZE > 1; gloo on CPU, NCCL on CUDA), else SINGLE."""
    from itda.builder.distributed import init_distributed

    exchange = init_distributed(torch.device(device))
    return SINGLE if exchange is None else BatchGroup(exchange)
