"""Scale-out over torch.distributed (torchrun): every rank streams its share, all hold one dictionary.

Rank r takes the stream's batches r, r + W, r + 2W, ... Per step each rank scores its batch
against the shared dictionary; the candidates of all ranks are gathered in rank order and every
rank applies the same deterministic selection, so the dictionaries stay identical. This equals a
single-process build whose batches are the W rank batches of a step concatenated, scored in
chunks of one rank batch (`build_dictionary(..., score_chunk=B)`). Rank 0 writes checkpoints
and the output. gloo on CPU, NCCL on CUDA; collectives time out after ITDA_DIST_TIMEOUT seconds
(default 300) so a dead peer ends the others with an error instead of a hang.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist

from itda.errors import ItdaInputError


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    """This process's rank under torchrun (RANK; 0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


class Exchange:
    """The collective steps of a distributed build (gather candidates, sum counters)."""

    def __init__(self, device: torch.device):
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _collective(self, call, *args, resume: bool = True):
        """Run a torch.distributed call; a dead or timed-out peer becomes one ItdaInputError line."""
        try:
            return call(*args)
        except RuntimeError as exc:
            hint = "; the checkpoint is intact, run the command again to resume" if resume else ""
            raise ItdaInputError(f"rank {self.rank}: another rank stopped ({str(exc).splitlines()[0]}){hint}") from None

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._collective(dist.all_gather, out, t)
        return out

    def gather_rows(self, rows_MX: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (any count, same trailing shape and dtype) concatenated in rank order."""
        count = torch.tensor([rows_MX.shape[0]], dtype=torch.int64, device=self.device)
        counts = [int(c) for c in self._all_gather(count)]
        pad = torch.zeros((max(counts + [1]),) + tuple(rows_MX.shape[1:]), dtype=rows_MX.dtype, device=self.device)
        pad[: counts[self.rank]] = rows_MX.to(self.device)
        return torch.cat([p[:c] for p, c in zip(self._all_gather(pad), counts, strict=True)]).to(rows_MX.device)

    def gather(self, unit_MD: torch.Tensor, refs_M5: torch.Tensor, tokens: int, loss_sum: float):
        """All ranks' candidates in rank order, total tokens and loss sum."""
        heads = self._all_gather(torch.tensor([tokens, loss_sum], dtype=torch.float64, device=self.device))
        unit = self.gather_rows(unit_MD.to(torch.float32))
        refs = self.gather_rows(refs_M5.to(torch.int64)).cpu()
        return unit, refs, int(sum(float(h[0]) for h in heads)), float(sum(float(h[1]) for h in heads))

    def sum_(self, t: torch.Tensor, piece_bytes: int = 1 << 28) -> torch.Tensor:
        """Sum t over ranks in place (in pieces of at most piece_bytes on the collective's device)."""
        return self.reduce_(t, "sum", piece_bytes)

    def reduce_(self, t: torch.Tensor, op: str = "sum", piece_bytes: int = 1 << 28) -> torch.Tensor:
        """Reduce t over ranks in place (op: sum, min or max), in pieces of at most piece_bytes."""
        reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
        flat = t.view(-1)
        step = max(1, piece_bytes // max(1, t.element_size()))
        for s in range(0, flat.numel(), step):
            part = flat[s : s + step].to(self.device)
            self._collective(dist.all_reduce, part, reduce_op, resume=False)
            flat[s : s + step] = part.to(t.device)
        return t

    def broadcast_(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's values of t on every rank, in place."""
        part = t.detach().to(self.device)
        self._collective(dist.broadcast, part, 0, resume=False)
        with torch.no_grad():
            t.copy_(part.to(t.device))
        return t

    def barrier(self) -> None:
        self._collective(dist.barrier, resume=False)


def init_distributed(device: torch.device) -> Exchange | None:
    """An Exchange when started by torchrun with WORLD_SIZE > 1, else None."""
    if world_size_from_env() <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=float(os.environ.get("ITDA_DIST_TIMEOUT", "300")))
        dist.init_process_group(backend=backend, timeout=timeout)
    return Exchange(device)


def rank_batches(batches: Iterable, rank: int, world: int, empty) -> Iterator:
    """This rank's share of a batch stream: batches rank, rank + W, ...; `empty` when its share runs out first."""
    buf = []
    for batch in batches:
        buf.append(batch)
        if len(buf) == world:
            yield buf[rank]
            buf = []
    if buf:
        yield buf[rank] if rank < len(buf) else empty


def interleaved_batches(batches: Iterable, world: int) -> Iterator:
    """The single-process equivalent: the W batches of each step concatenated (acts, refs)."""
    buf = []
    for batch in batches:
        buf.append(batch)
        if len(buf) == world:
            yield torch.cat([b[0] for b in buf]), torch.cat([b[1] for b in buf])
            buf = []
    if buf:
        yield torch.cat([b[0] for b in buf]), torch.cat([b[1] for b in buf])
