"""TopK SAE trainer fed by any iterator of activation batches [B, D]; blind to where they come from.

Per step: loss = FVU + auxk_alpha * AuxK (dead latents = not fired in `dead_after_tokens`
tokens); Adam; the gradient along each decoder row is projected out before the step and the
rows are renormalised after it. Optional dead-latent resampling with the ITDA rule: the rows of
the batch the SAE reconstructs worst (lowest cosine), greedily kept when no kept row is within
the build's cosine of them, become the dead latents' decoder rows. Checkpoints hold the full
state (weights, Adam moments, counters) so a resumed run is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from itda.tensorfile import json_entry, read_tensor_file, write_tensor_file
from itda.errors import ItdaInputError
from itda.sae.model import SaeConfig, TopKSAE

RESAMPLE_RULES = (None, "itda")
_CKPT_KEY = "itda_sae_checkpoint"
_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    lr: float | None = None  # default 2e-4 / sqrt(F / 2^14), sparsify's scaling
    auxk_alpha: float = 1 / 32
    k_aux: int | None = None  # default d_in / 2
    dead_after_tokens: int = 1_000_000
    resample: str | None = None  # None (AuxK alone) or "itda"
    resample_every: int = 200
    resample_min_cosine: float = 0.85  # ITDA rule: kept rows pairwise below this |cos|
    seed: int = 0

    def validate(self) -> None:
        if self.steps < 1:
            raise ItdaInputError(f"--steps must be >= 1, got {self.steps}")
        if self.lr is not None and not self.lr > 0:
            raise ItdaInputError(f"--lr must be > 0, got {self.lr}")
        if self.resample not in RESAMPLE_RULES:
            raise ItdaInputError(f"unknown --resample {self.resample!r}; choose itda or leave it out")
        if self.resample_every < 1 or self.dead_after_tokens < 1:
            raise ItdaInputError("--resample-every and --dead-after-tokens must be >= 1")

    def learning_rate(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / (n_latents / 2**14) ** 0.5


class StepStats(NamedTuple):
    step: int  # steps done after this one
    fvu: float
    auxk_loss: float
    dead: int  # latents not fired in dead_after_tokens tokens
    l0: float  # mean active latents per token
    resampled: int  # latents resampled at this step


class SaeTrainer:
    def __init__(self, sae: TopKSAE, config: TrainConfig):
        config.validate()
        self.sae = sae
        self.config = config
        self.lr = config.learning_rate(sae.cfg.n_latents)
        self.opt = torch.optim.Adam([getattr(sae, n) for n in _PARAMS], lr=self.lr, betas=(0.9, 0.999), eps=1e-8)
        self.since_fired_F = torch.zeros(sae.cfg.n_latents, dtype=torch.int64, device=sae.device)
        self.step_count = 0
        self.tokens_seen = 0
        self.resampled_total = 0

    # -- one step -------------------------------------------------------------------------------
    def dead_mask(self) -> Tensor:
        return self.since_fired_F >= self.config.dead_after_tokens

    def step(self, x_BD: Tensor) -> StepStats:
        if x_BD.ndim != 2 or x_BD.shape[1] != self.sae.cfg.d_in:
            raise ItdaInputError(f"activation batch has shape {tuple(x_BD.shape)}, the SAE d_in={self.sae.cfg.d_in}")
        x = x_BD.to(device=self.sae.device, dtype=torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ItdaInputError(f"activation batch at step {self.step_count} contains NaN or inf")
        self.sae.train()
        dead = self.dead_mask()
        out = self.sae(x, dead, self.config.k_aux)
        loss = out.fvu + self.config.auxk_alpha * out.auxk_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sae.remove_parallel_grads()
        self.opt.step()
        self.sae.normalise_decoder()
        fired_F = torch.zeros_like(dead)
        active = out.top_acts > 0
        fired_F[out.top_indices[active]] = True
        self.since_fired_F += x.shape[0]
        self.since_fired_F[fired_F] = 0
        self.step_count += 1
        self.tokens_seen += x.shape[0]
        resampled = 0
        if self.config.resample == "itda" and self.step_count % self.config.resample_every == 0:
            resampled = self.resample_dead(x)
        return StepStats(self.step_count, float(out.fvu.detach()), float(out.auxk_loss.detach()), int(self.dead_mask().sum()),
                         float(active.sum()) / x.shape[0], resampled)

    @torch.no_grad()
    def resample_dead(self, x_BD: Tensor) -> int:
        """ITDA rule: the worst-reconstructed rows (lowest cosine, pairwise dissimilar) replace dead latents."""
        from itda.build.candidates import greedy_dissimilar

        dead = torch.nonzero(self.dead_mask()).squeeze(1)
        if len(dead) == 0:
            return 0
        self.sae.eval()
        x_hat = self.sae.reconstruct(x_BD)
        centred = x_BD - self.sae.b_dec
        cos = torch.nn.functional.cosine_similarity(centred, x_hat - self.sae.b_dec, dim=1)
        order = torch.argsort(cos, stable=True)[: 4 * len(dead)]
        unit = centred[order] / centred[order].norm(dim=1, keepdim=True).clamp(min=1e-12)
        keep = greedy_dissimilar(unit, torch.ones(len(order), dtype=torch.bool, device=unit.device),
                                 self.config.resample_min_cosine)
        rows = unit[keep][: len(dead)]
        targets = dead[: len(rows)]
        alive = ~self.dead_mask()
        enc_norm = float(self.sae.W_enc[alive].norm(dim=1).mean()) if bool(alive.any()) else 1.0
        self.sae.W_dec[targets] = rows
        self.sae.W_enc[targets] = rows * enc_norm
        self.sae.b_enc[targets] = 0.0
        for name in ("W_enc", "b_enc", "W_dec"):
            state = self.opt.state.get(getattr(self.sae, name), {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][targets] = 0.0
        self.since_fired_F[targets] = 0
        self.resampled_total += len(targets)
        return len(targets)

    # -- a run ----------------------------------------------------------------------------------
    def fit(
        self,
        batches: Iterable[Tensor],
        *,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        checkpoint_extra: dict | None = None,
        progress: bool = True,
        callback: Callable[["SaeTrainer", StepStats], None] | None = None,
    ) -> list[StepStats]:
        """Train until config.steps; `batches` yields the stream from its start (already-done steps are skipped)."""
        history: list[StepStats] = []
        remaining = self.config.steps - self.step_count
        it: Iterator[Tensor] = itertools.islice(iter(batches), self.step_count, None)
        bar = tqdm(total=self.config.steps, initial=self.step_count, unit="step", disable=not progress, desc="sae")
        t0 = time.perf_counter()
        try:
            for x in itertools.islice(it, remaining):
                stats = self.step(x)
                history.append(stats)
                bar.update(1)
                bar.set_postfix(fvu=f"{stats.fvu:.4f}", dead=stats.dead, tok_s=f"{self.tokens_seen / max(time.perf_counter() - t0, 1e-9):,.0f}", refresh=False)
                if callback is not None:
                    callback(self, stats)
                if checkpoint is not None and checkpoint_every and self.step_count % checkpoint_every == 0:
                    self.save_checkpoint(checkpoint, checkpoint_extra)
        except KeyboardInterrupt:
            if checkpoint is not None:
                self.save_checkpoint(checkpoint, checkpoint_extra)
            raise
        finally:
            bar.close()
        if self.step_count < self.config.steps:
            raise ItdaInputError(f"the activation stream ended after {self.step_count} of {self.config.steps} steps")
        return history

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        tensors = {f"sae.{n}": getattr(self.sae, n).detach().cpu().contiguous() for n in _PARAMS}
        for n in _PARAMS:
            st = self.opt.state.get(getattr(self.sae, n), {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    tensors[f"adam.{n}.{key}"] = st[key].detach().cpu().reshape(-1) if key == "step" else st[key].detach().cpu().contiguous()
        tensors["since_fired"] = self.since_fired_F.cpu().contiguous()
        state = {"sae": self.sae.cfg.to_dict(), "config": asdict(self.config), "step_count": self.step_count,
                 "tokens_seen": self.tokens_seen, "resampled_total": self.resampled_total, "extra": extra or {}}
        write_tensor_file(path, tensors, _CKPT_KEY, state)

    @classmethod
    def load_checkpoint(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple["SaeTrainer", dict]:
        header, tensors = read_tensor_file(path, "itda SAE checkpoint")
        state = json_entry(header, _CKPT_KEY, path, "itda SAE checkpoint")
        try:
            sae = TopKSAE(SaeConfig(**state["sae"]))
            with torch.no_grad():
                for n in _PARAMS:
                    getattr(sae, n).copy_(tensors[f"sae.{n}"])
            trainer = cls(sae.to(device), TrainConfig(**state["config"]))
            for n in _PARAMS:
                if f"adam.{n}.step" in tensors:
                    p = getattr(trainer.sae, n)
                    trainer.opt.state[p] = {
                        "step": tensors[f"adam.{n}.step"].reshape(()).clone(),
                        "exp_avg": tensors[f"adam.{n}.exp_avg"].to(device),
                        "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"].to(device),
                    }
            trainer.since_fired_F = tensors["since_fired"].to(device)
            trainer.step_count = int(state["step_count"])
            trainer.tokens_seen = int(state["tokens_seen"])
            trainer.resampled_total = int(state.get("resampled_total", 0))
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise ItdaInputError(f"{path}: not a readable itda SAE checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        return trainer, state.get("extra", {})


# -- batch streams ---------------------------------------------------------------------------------
def shuffled_batches(acts_TD: Tensor, batch_size: int, seed: int = 0) -> Iterator[Tensor]:
    """Endless batches of rows, a fresh seeded permutation per epoch; the partial tail is dropped."""
    n = acts_TD.shape[0]
    if batch_size < 1 or batch_size > n:
        raise ItdaInputError(f"--batch-size must be between 1 and the {n} training rows, got {batch_size}")
    for epoch in itertools.count():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for s in range(0, n - batch_size + 1, batch_size):
            yield acts_TD[perm[s : s + batch_size]]


def rebatch(chunks: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Regroup a stream of [n_i, D] chunks (e.g. one per forward pass) into [batch_size, D] batches."""
    buf: list[Tensor] = []
    held = 0
    for chunk in chunks:
        buf.append(chunk)
        held += chunk.shape[0]
        while held >= batch_size:
            flat = torch.cat(buf)
            yield flat[:batch_size]
            rest = flat[batch_size:]
            buf, held = ([rest] if rest.shape[0] else []), rest.shape[0]
