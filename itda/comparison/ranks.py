"""Everything a model comparison does across torchrun ranks, in one place.

`Ranks` wraps an itda.builder.distributed.Exchange (None: one process). Rank r forwards the
document chunks r, r + W, ...; the CKA sums are added up over ranks, the kept rows gathered in
chunk order, the Jaccard and centred dictionaries built with the ranks' candidates gathered per
step. One process with interleave=W walks the same steps, forwarding every chunk of each.
"""

from __future__ import annotations

import torch

from itda.builder import DictionaryBuilder
from itda.pursuit.gram import GramPool


class Ranks:
    """This process's share of the chunks and the collective operations of a comparison."""

    def __init__(self, exchange=None, interleave: int = 1):
        self.exchange = exchange
        self.rank = exchange.rank if exchange is not None else 0
        self.world = exchange.world if exchange is not None else max(1, interleave)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.exchange is not None

    def steps(self, chunks: list):
        """Per step (W chunks), the (chunk index, chunk) pairs this process forwards."""
        for first in range(0, len(chunks), self.world):
            step = list(enumerate(chunks[first : first + self.world], first))
            yield step if self.exchange is None else step[self.rank : self.rank + 1]

    def tokens_forwarded(self, rows: int) -> int:
        """Progress-bar tokens for `rows` forwarded here (under torchrun, every rank's like share)."""
        return rows * (self.world if self.exchange is not None else 1)

    def sum_count(self, n: int) -> int:
        if self.exchange is None:
            return n
        return int(self.exchange.sum_(torch.tensor([float(n)], dtype=torch.float64)).item())

    def sum_grids(self, *grids) -> None:
        """Add up every rank's sums of these CKA grids / PerTokenGrids (None entries skipped)."""
        if self.exchange is not None:
            for grid in grids:
                if grid is not None:
                    grid.sum_over(self.exchange)

    def update_builders(
        self,
        builders: list[DictionaryBuilder],
        batches: list[list],
        centres_LD: torch.Tensor | None = None,
        grams: GramPool | None = None,
    ) -> None:
        """One build step per layer: this rank's batch with the ranks' candidates gathered (torchrun),
        or the step's batches concatenated and scored batch by batch (one process, interleave); with
        centres_LD, over the rows minus their layer's centre; with grams, its budget kept after each layer."""
        for layer, builder in enumerate(builders):
            self._update_builder(layer, builder, batches, centres_LD)
            if grams is not None:
                grams.trim()

    def _update_builder(
        self, layer: int, builder: DictionaryBuilder, batches: list[list], centres_LD: torch.Tensor | None
    ) -> None:
        parts = [b[layer].unit if centres_LD is None else b[layer].dense() - centres_LD[layer] for b in batches]
        refs = [b[layer].refs for b in batches]
        if self.exchange is not None:
            rows = parts[0] if parts else torch.zeros(0, builder.d)
            builder.update(rows, refs[0] if refs else torch.zeros(0, 5, dtype=torch.int64), exchange=self.exchange)
        elif parts:
            builder.update(torch.cat(parts), torch.cat(refs), score_chunk=[len(p) for p in parts])

    def earliest_means(self, chunks: list[list[torch.Tensor]], width: int) -> torch.Tensor | None:
        """float64 [width]: the per-layer row means, concatenated, of the earliest of this step's chunks
        with rows (each chunk: its layers' [n, d] rows), the same on every rank (None: none has rows)."""
        mine = [torch.cat([x.double().mean(0) for x in layers]) for layers in chunks if len(layers[0])]
        rows = torch.stack(mine[:1]) if mine else torch.zeros(0, width, dtype=torch.float64)
        if self.exchange is not None:
            rows = self.exchange.gather_rows(rows)
        return rows[0] if len(rows) else None

    def gather_kept(
        self,
        kept: list[list[torch.Tensor]],
        kept_chunk: list[torch.Tensor],
        max_rows: int,
        d: int,
        order: torch.Tensor | None = None,
    ) -> tuple[list[list[torch.Tensor]], torch.Tensor]:
        """The first max_rows of every rank's kept rows in chunk order (the same on all ranks), and
        that order (pass it back for the other model's rows)."""
        exchange = self.exchange
        assert exchange is not None  # only under torchrun (KeptRows.gather)
        if order is None:
            mine = torch.cat(kept_chunk) if kept_chunk else torch.zeros(0, dtype=torch.int64)
            chunk = exchange.gather_rows(mine)
            order = torch.sort(chunk, stable=True).indices[:max_rows]
        return [[exchange.gather_rows(torch.cat(s) if s else torch.zeros(0, d))[order]] for s in kept], order
