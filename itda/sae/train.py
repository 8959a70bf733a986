"""SAE trainer fed by any iterator of activation batches [B, D]; blind to where they come from.

Per step: loss = the architecture's reconstruction loss (the FVU; Matryoshka: the sum of its prefixes'
FVUs) + auxk_alpha * AuxK (dead latents = not fired in `dead_after_tokens` tokens); the architectures
with an inference threshold update it from the step's selection (before the update); Adam; the gradient
along each decoder row is projected out before the step and the rows are renormalised after it.
Optional dead-latent resampling with the ITDA rule: the rows of the batch the SAE reconstructs worst
(lowest cosine), greedily kept when no kept row is within the build's cosine of them, become the dead
latents' decoder rows. Checkpoints hold the full state (weights, threshold, Adam moments, counters, the
last FVU) so a resumed run is byte-identical to an uninterrupted one. Batches without variance and
non-finite losses are refused before the update; training_bytes estimates the memory a run needs before
anything is allocated.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from itda.builder.builder import BuildConfig
from itda.configfields import FieldError, choice
from itda.errors import ItdaInputError
from itda.sae.arch import ARCH_NAMES, get_arch
from itda.sae.batchgroup import SINGLE, BatchGroup
from itda.sae.io import Fields, check_threshold, check_weights, checked_config
from itda.sae.model import SaeConfig, TopKSAE
from itda.tensorfile import json_entry, read_tensor_file, write_tensor_file

RESAMPLE_RULES = (None, "itda")
DEFAULT_LR_SCALE = 2e-3  # Adam at F = 2^14; chosen by the lr sweep of benchmarks/perf/sae_vs_sparsify.py
MAX_LR = 1e3  # Adam moves each weight by about lr a step: far past any use for unit-norm decoder rows
_CKPT_KEY = "itda_sae_checkpoint"
_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass(frozen=True)
class TrainConfig:
    """How the SAE is optimised (stored in checkpoints and in the SAE file's train record)."""

    steps: int = choice(1000, "Optimizer steps.")
    lr: float | None = choice(
        None, "Adam learning rate (default 2e-3 / sqrt(F / 2^14): benchmarks/perf/sae_vs_sparsify.py)."
    )
    lr_warmup_steps: int = choice(0, "Steps of linear learning-rate warm-up from 0.")
    lr_decay: float = choice(
        0.2,
        "Fraction of the last steps over which the learning rate decays linearly to 0 (0: constant; "
        "0.2 chosen by measurement: benchmarks/RESULTS.md, the learning-rate schedule).",
    )
    auxk_alpha: float = choice(1 / 32, "Weight of the AuxK loss.")
    k_aux: int | None = choice(None, "AuxK: dead latents used per token (default d_in / 2).")
    dead_after_tokens: int = choice(1_000_000, "A latent is dead after this many tokens without firing.")
    resample: str | None = choice(None, "'itda': replace dead latents by the worst-reconstructed activations.")
    resample_every: int = choice(200, "Steps between resamplings.")
    resample_min_cosine: float = choice(
        BuildConfig.DEFAULT_MIN_COSINE, "ITDA resampling: kept rows pairwise below this |cos|."
    )
    seed: int = choice(0, "Seed of the initialisation, the batch order and resampling.")
    threshold_lr: float = choice(
        0.01, "batchtopk, matryoshka_batchtopk: EMA rate of the inference threshold (SAELens's topk_threshold_lr)."
    )

    def validate(self) -> None:
        if self.steps < 1:
            raise FieldError("steps", f"must be >= 1, got {self.steps}")
        if self.lr is not None and not 0 < self.lr <= MAX_LR:
            raise FieldError("lr", f"must be > 0 and at most {MAX_LR:g}, got {self.lr}")
        if not 0 <= self.auxk_alpha < math.inf:
            raise FieldError("auxk_alpha", f"must be a finite number >= 0, got {self.auxk_alpha}")
        if not 0 <= self.seed < 2**32:
            raise FieldError("seed", f"must be an integer from 0 to 2^32 - 1, got {self.seed}")
        if self.resample not in RESAMPLE_RULES:
            raise FieldError("resample", f"unknown {{field}} {self.resample!r}; choose itda or leave it out")
        for name in ("resample_every", "dead_after_tokens"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0 < self.threshold_lr <= 1:
            raise FieldError("threshold_lr", f"must be in (0, 1], got {self.threshold_lr}")
        if self.lr_warmup_steps < 0:
            raise FieldError("lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps}")
        if not 0 <= self.lr_decay <= 1:
            raise FieldError("lr_decay", f"must be in [0, 1], got {self.lr_decay}")

    def learning_rate(self, n_latents: int) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR_SCALE / (n_latents / 2**14) ** 0.5

    def lr_factor(self, step: int) -> float:
        """The learning rate's multiplier at 0-based step `step`: linear warm-up over lr_warmup_steps, then 1,
        then over the last round(lr_decay * steps) steps a linear fall to 1/that count at the last step."""
        warm = min(1.0, (step + 1) / self.lr_warmup_steps) if self.lr_warmup_steps else 1.0
        decay_steps = round(self.lr_decay * self.steps)
        return warm * (min(1.0, (self.steps - step) / decay_steps) if decay_steps else 1.0)


@dataclass(frozen=True)
class SaeSpec:
    """The SAE to train (its shape and initialisation) and the batches it sees."""

    latents: int = choice(help="Number of latents F.")
    k: int = choice(32, "Active latents per token (batchtopk archs: on average over a training batch).")
    arch: str = choice("topk", f"SAE architecture: {', '.join(ARCH_NAMES)}.")
    matryoshka_widths: str | Sequence[int] | None = choice(
        None, "matryoshka_batchtopk: nested prefix widths, comma-separated (e.g. 256,512,1024; the last = latents)."
    )
    init: str = choice(
        "kaiming",
        "kaiming, orthogonal, data, mean-subtracted, centroid-subtracted, outliers, itda:DICT, transfer:SAE_OR_DICT.",
    )
    batch_size: int = choice(4096, "Tokens per step.")
    b_dec: str = choice("median", "Decoder bias from the init sample: median (geometric), mean or zero.")
    fill: str | None = choice(
        "data",
        "itda/transfer init with more latents than atoms: fill the rest with 'data', 'kaiming' or 'outliers' rows.",
    )
    centre_atoms: bool = choice(
        True,
        "itda/transfer init: decoder rows from b_dec to a typical activation along each atom "
        "(benchmarks/quality/sae_init_study.py).",
    )
    crop: bool = choice(False, "itda/transfer init with fewer latents than atoms: keep the first atoms.")
    batch_topk: bool = choice(False, "Deprecated: the same as --arch batchtopk.")
    init_sample: int = choice(16_384, "Activations the init and b_dec are computed from.")
    holdout: float = choice(
        0.05, "Activation file: fraction of rows (the last ones) held out for the final evaluation."
    )

    def validate(self) -> None:
        if self.latents < 1:
            raise FieldError("latents", f"must be >= 1, got {self.latents}")
        if not 1 <= self.k <= self.latents:
            raise FieldError("k", f"must be between 1 and latents ({self.latents}), got {self.k}")
        if self.batch_size < 2:
            raise FieldError(
                "batch_size", f"must be >= 2 (the FVU loss needs a batch's variance), got {self.batch_size}"
            )
        if self.init_sample < 1:
            raise FieldError("init_sample", f"must be >= 1, got {self.init_sample}")
        if not 0.0 <= self.holdout < 1.0:
            raise FieldError("holdout", f"must be in [0, 1), got {self.holdout}")
        self.sae_config(1)

    def arch_name(self) -> str:
        """arch, or batchtopk for the deprecated batch_topk; refused when unknown or both disagree."""
        if self.arch not in ARCH_NAMES:
            raise FieldError("arch", f"unknown {{field}} {self.arch!r}; choose one of {', '.join(ARCH_NAMES)}")
        if self.batch_topk and self.arch not in ("topk", "batchtopk"):
            raise FieldError(
                "batch_topk",
                f"{{field}} means {{arch}} batchtopk; it cannot go with {{arch}} {self.arch}",
                others=("arch",),
            )
        return "batchtopk" if self.batch_topk else self.arch

    def widths(self) -> tuple[int, ...]:
        """matryoshka_widths as ints (a comma list or a sequence), the latents appended when last is below."""
        raw = self.matryoshka_widths
        if raw is None or raw == "":
            return ()
        parts = raw.split(",") if isinstance(raw, str) else list(raw)
        try:
            widths = [int(str(p).strip()) for p in parts]
        except ValueError:
            raise FieldError("matryoshka_widths", f"must be integers separated by commas, got {raw!r}") from None
        return tuple(widths + [self.latents] if widths and widths[-1] < self.latents else widths)

    def sae_config(self, d: int) -> SaeConfig:
        """The SaeConfig of this spec for activations of dimension d; refused when arch and widths disagree."""
        cfg = SaeConfig(d, self.latents, self.k, self.arch_name(), self.widths())
        problem = get_arch(cfg.arch).config_error(cfg)
        if problem is not None:
            raise FieldError(problem[0], f"{{field}} {problem[1]}")
        return cfg


def training_bytes(cfg: SaeConfig, batch_size: int) -> int:
    """Bytes an SAE's training holds: weights, gradients and Adam's two moments (four float32 copies of
    W_enc, W_dec [F, D], b_enc [F], b_dec [D]), two [F, D] temporaries (the decoder-gradient projection,
    Adam's update), the int64 last-fired counters, and three float32 [B, F] tensors of a step (the
    pre-activations, their gradient, AuxK's masked copy). Within 10% of the measured peak on CPU."""
    f, d = cfg.n_latents, cfg.d_in
    prefixes = 3 * batch_size * d * max(0, len(cfg.matryoshka_widths) - 1)  # Matryoshka: a recon, error, grad each
    return 4 * (4 * (2 * f * d + f + d) + 2 * f * d + 3 * batch_size * f + prefixes) + 8 * f


class StepStats(NamedTuple):
    step: int  # steps done after this one
    fvu: float
    auxk_loss: float
    dead: int  # latents not fired in dead_after_tokens tokens
    l0: float  # mean active latents per token
    resampled: int  # latents resampled at this step


class SaeTrainer:
    """Trains one SAE; under torchrun (`group` of several ranks) each rank steps on its shard of every
    batch, the batch-wide terms and the gradients reduced over the ranks so all ranks hold the same SAE."""

    def __init__(self, sae: TopKSAE, config: TrainConfig, group: BatchGroup = SINGLE):
        config.validate()
        self.sae = sae
        self.config = config
        self.group = group
        self.lr = config.learning_rate(sae.cfg.n_latents)
        self.opt = torch.optim.Adam([getattr(sae, n) for n in _PARAMS], lr=self.lr, betas=(0.9, 0.999), eps=1e-8)
        self.since_fired_F = torch.zeros(sae.cfg.n_latents, dtype=torch.int64, device=sae.device)
        self.step_count = 0
        self.tokens_seen = 0
        self.resampled_total = 0
        self.last_fvu: float | None = None  # training FVU of the latest step (kept in checkpoints)

    # -- one step -------------------------------------------------------------------------------
    def dead_mask(self) -> Tensor:
        return self.since_fired_F >= self.config.dead_after_tokens

    def checked_batch(self, x_BD: Tensor) -> Tensor:
        """x as float32 on the SAE's device; refused unless [B >= 2, d_in], finite and not all rows equal."""
        n = self.step_count
        if x_BD.ndim != 2 or x_BD.shape[1] != self.sae.cfg.d_in:
            raise ItdaInputError(f"activation batch has shape {tuple(x_BD.shape)}, the SAE d_in={self.sae.cfg.d_in}")
        if x_BD.shape[0] < 2:
            raise ItdaInputError(
                f"activation batch at step {n} has {x_BD.shape[0]} row(s); the FVU loss needs at least 2"
            )
        x = x_BD.to(device=self.sae.device, dtype=torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ItdaInputError(f"activation batch at step {n} contains NaN or inf")
        if bool((x == x[:1]).all()):
            raise ItdaInputError(
                f"activation batch at step {n} has no variance (all {x.shape[0]} rows are equal): FVU is undefined"
            )
        return x

    def step(self, x_BD: Tensor) -> StepStats:
        """One optimiser step on a batch (under torchrun: this rank's shard of the step's batch)."""
        x = self.checked_batch(x_BD)
        group = self.group
        self.sae.train()
        dead = self.dead_mask()
        out = self.sae(x, dead, self.config.k_aux, group)
        loss = out.recon_loss + self.config.auxk_alpha * out.auxk_loss
        fvu, aux = (float(group.sum(t.detach())) for t in (out.fvu, out.auxk_loss))
        if not (math.isfinite(fvu) and math.isfinite(aux)):
            raise FieldError(
                "lr",
                f"training diverged at step {self.step_count}: the loss is not finite (FVU {fvu}, "
                f"AuxK {aux}); lower {{field}}",
            )
        self.sae.arch.after_forward(self.sae, out.top_acts.detach(), self.config.threshold_lr, group)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        group.sum_grads_(getattr(self.sae, n) for n in _PARAMS)
        self.sae.remove_parallel_grads()
        for g in self.opt.param_groups:  # a pure function of the step: a resumed run follows the same schedule
            g["lr"] = self.lr * self.config.lr_factor(self.step_count)
        self.opt.step()
        self.sae.normalise_decoder()
        fired_F = torch.zeros_like(dead)
        active = out.top_acts > 0
        fired_F[out.top_indices[active]] = True
        rows, fired_F = group.rows(x.shape[0]), group.any_(fired_F)
        self.since_fired_F += rows
        self.since_fired_F[fired_F] = 0
        self.step_count += 1
        self.tokens_seen += rows
        resampled = 0
        if self.config.resample == "itda" and self.step_count % self.config.resample_every == 0:
            resampled = self.resample_dead(group.gather_rows(x))  # every rank: the same rows, the same choice
        self.last_fvu = fvu
        l0 = float(group.sum(active.sum())) / rows
        return StepStats(self.step_count, fvu, aux, int(self.dead_mask().sum()), l0, resampled)

    @torch.no_grad()
    def resample_dead(self, x_BD: Tensor) -> int:
        """ITDA rule: the worst-reconstructed rows (lowest cosine, pairwise dissimilar) replace dead latents."""
        from itda.builder.candidates import greedy_dissimilar

        dead = torch.nonzero(self.dead_mask()).squeeze(1)
        if len(dead) == 0:
            return 0
        self.sae.eval()
        enc = self.sae.encode(x_BD, training=True)  # what the loss reconstructs (TopK: the inference rule)
        x_hat = self.sae.decode(enc.top_acts, enc.top_indices)
        centred = x_BD - self.sae.b_dec
        cos = torch.nn.functional.cosine_similarity(centred, x_hat - self.sae.b_dec, dim=1)
        order = torch.argsort(cos, stable=True)[: 4 * len(dead)]
        unit = centred[order] / centred[order].norm(dim=1, keepdim=True).clamp(min=1e-12)
        keep = greedy_dissimilar(
            unit, torch.ones(len(order), dtype=torch.bool, device=unit.device), self.config.resample_min_cosine
        )
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
        callback: Callable[[SaeTrainer, StepStats], None] | None = None,
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
                bar.set_postfix(
                    fvu=f"{stats.fvu:.4f}",
                    dead=stats.dead,
                    tok_s=f"{self.tokens_seen / max(time.perf_counter() - t0, 1e-9):,.0f}",
                    refresh=False,
                )
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
        """Atomically write the full state (under torchrun rank 0 writes: every rank holds the same state)."""
        if not self.group.is_root:
            return
        tensors = {f"sae.{n}": getattr(self.sae, n).detach().cpu().contiguous() for n in _PARAMS}
        for n in _PARAMS:
            st = self.opt.state.get(getattr(self.sae, n), {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    tensors[f"adam.{n}.{key}"] = (
                        st[key].detach().cpu().reshape(-1) if key == "step" else st[key].detach().cpu().contiguous()
                    )
        tensors["since_fired"] = self.since_fired_F.cpu().contiguous()
        if self.sae.arch.uses_threshold:
            tensors["sae.threshold"] = self.sae.threshold.detach().cpu().reshape(1)
        state = {
            "sae": self.sae.cfg.to_dict(),
            "config": asdict(self.config),
            "step_count": self.step_count,
            "tokens_seen": self.tokens_seen,
            "resampled_total": self.resampled_total,
            "last_fvu": self.last_fvu,
            "extra": extra or {},
        }
        write_tensor_file(path, tensors, _CKPT_KEY, state)

    @classmethod
    def load_checkpoint(
        cls, path: str | os.PathLike, device: torch.device | str = "cpu", group: BatchGroup = SINGLE
    ) -> tuple[SaeTrainer, dict]:
        """(trainer, extra) from a checkpoint; its config and tensor shapes are checked before anything is allocated."""
        header, tensors = read_tensor_file(path, "itda SAE checkpoint")
        state = json_entry(header, _CKPT_KEY, path, "itda SAE checkpoint")
        cfg = checked_config(path, state.get("sae"), prefix="sae.")
        _check_state(path, state, tensors, cfg)
        try:
            sae = TopKSAE(cfg)
            with torch.no_grad():
                for n in _PARAMS:
                    getattr(sae, n).copy_(tensors[f"sae.{n}"])
                if sae.arch.uses_threshold:
                    sae.threshold.copy_(tensors["sae.threshold"].reshape(()))
            constant = {"lr_warmup_steps": 0, "lr_decay": 0.0}  # a checkpoint from before the schedule fields
            trainer = cls(sae.to(device), TrainConfig(**{**constant, **state["config"]}), group)
            for n in _PARAMS:
                if f"adam.{n}.step" in tensors:
                    p = getattr(trainer.sae, n)
                    trainer.opt.state[p] = {
                        "step": tensors[f"adam.{n}.step"].reshape(()).clone(),
                        "exp_avg": tensors[f"adam.{n}.exp_avg"].to(device),
                        "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"].to(device),
                    }
            trainer.since_fired_F = tensors["since_fired"].to(device)
            trainer.step_count = state["step_count"]
            trainer.tokens_seen = state["tokens_seen"]
            trainer.resampled_total = state.get("resampled_total", 0)
            trainer.last_fvu = None if state.get("last_fvu") is None else float(state["last_fvu"])
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise ItdaInputError(
                f"{path}: not a readable itda SAE checkpoint "
                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            ) from None
        return trainer, state.get("extra", {})


def _check_state(path, state: dict, tensors: dict[str, Tensor], cfg: SaeConfig) -> None:
    """A checkpoint's counters (ints >= 0, last_fvu a number or null) and tensor shapes, against cfg."""
    f = Fields(path, state)
    for key in ("step_count", "tokens_seen"):
        f.integer(key, 0)
    f.integer("resampled_total", 0, default=0)
    f.mapping("extra", {})
    f.mapping("config")
    if not isinstance(state.get("last_fvu"), (int, float, type(None))) or isinstance(state.get("last_fvu"), bool):
        raise f.fail("last_fvu", "a number or null")
    shapes = {
        "W_enc": (cfg.n_latents, cfg.d_in),
        "b_enc": (cfg.n_latents,),
        "W_dec": (cfg.n_latents, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    check_weights(path, {n: tensors[f"sae.{n}"] for n in shapes if f"sae.{n}" in tensors}, cfg.d_in, cfg.n_latents)
    want = {f"adam.{n}.{key}": shape for n, shape in shapes.items() for key in ("exp_avg", "exp_avg_sq")}
    want.update({f"adam.{n}.step": (1,) for n in shapes}, since_fired=(cfg.n_latents,))
    for name, t in tensors.items():
        if name in want and tuple(t.shape) != want[name]:
            raise ItdaInputError(
                f"{path}: checkpoint tensor {name} has shape {list(t.shape)}, expected {list(want[name])}"
            )
    if "since_fired" not in tensors or tensors["since_fired"].dtype != torch.int64:
        raise ItdaInputError(f"{path}: checkpoint tensor since_fired is missing or not int64")
    if get_arch(cfg.arch).uses_threshold:
        check_threshold(path, tensors.get("sae.threshold"))
        if tensors["sae.threshold"].dtype != torch.float64:
            raise ItdaInputError(f"{path}: checkpoint tensor sae.threshold is not float64")


# -- batch streams ---------------------------------------------------------------------------------
def shuffled_batches(acts_TD: Tensor, batch_size: int, seed: int = 0) -> Iterator[Tensor]:
    """Endless batches of rows, a fresh seeded permutation per epoch; the partial tail is dropped."""
    n = acts_TD.shape[0]
    if batch_size < 1 or batch_size > n:
        raise FieldError("batch_size", f"must be between 1 and the {n} training rows, got {batch_size}")
    for epoch in itertools.count():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for s in range(0, n - batch_size + 1, batch_size):
            yield acts_TD[perm[s : s + batch_size]]


class ScaledBatches:
    """The batches of a stream as float32 times `factor` (a power of two: exact); re-iterable when the stream is."""

    def __init__(self, batches: Iterable[Tensor], factor: float):
        self.batches, self.factor = batches, factor

    def __iter__(self) -> Iterator[Tensor]:
        return (x.to(torch.float32) * self.factor for x in self.batches)


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
