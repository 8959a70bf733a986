"""The one place that chooses between the exact and the minibatch CKA grid of all layer pairs.

Both grids share one interface: update(xs, ys), sum_over(exchange), matrices(procrustes) ->
{'cka', ...} [L_A, L_B]. The exact StreamingCKAGrid runs while its float64 accumulators fit the
memory budget; past it MinibatchCKAGrid (memory independent of the width, CKA only).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from itda.comparison.minibatch import MinibatchCKAGrid, exact_grid_bytes
from itda.comparison.streaming import StreamingCKAGrid

CKAGrid = StreamingCKAGrid | MinibatchCKAGrid


class GridChoice(NamedTuple):
    """Which CKA grid runs for layers (L_A, d_A) x (L_B, d_B), and the bytes the exact one needs."""

    exact: bool
    exact_bytes: int
    layers: tuple[int, int]
    minibatch: int  # tokens per minibatch when not exact
    memory: int | None  # the budget (None: no limit)


def choose_grid(layers_a: int, d_a: int, layers_b: int, d_b: int, memory: int | None, minibatch: int) -> GridChoice:
    """Exact when the accumulators fit `memory` bytes (None: always), else minibatch."""
    need = exact_grid_bytes(layers_a, d_a, layers_b, d_b)
    return GridChoice(memory is None or need <= memory, need, (layers_a, layers_b), minibatch, memory)


def make_grid(choice: GridChoice, precision: str = "float64", dims: tuple[int, int] | None = None) -> CKAGrid:
    """A fresh grid as chosen; dims (d_A, d_B): start the exact sums around zero pilot means."""
    if not choice.exact:
        return MinibatchCKAGrid(choice.minibatch, choice.layers)
    grid = StreamingCKAGrid(precision)
    if dims is not None:
        grid.set_pilots(torch.zeros(choice.layers[0], dims[0]), torch.zeros(choice.layers[1], dims[1]))
    return grid


def grid_bytes(choice: GridChoice) -> int:
    """Accumulator bytes of the grid that runs."""
    if choice.exact:
        return choice.exact_bytes
    return MinibatchCKAGrid.memory_bytes(choice.layers[0], choice.layers[1], choice.minibatch)
