"""What an SAE architecture decides: which latents a batch keeps in training and at inference, the
reconstruction loss, what it learns besides the weights, and the SAELens form it is exported as."""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor

from itda.sae.batchgroup import SINGLE, BatchGroup


class SaeConfigLike(Protocol):
    """What an architecture reads of an itda.sae.model.SaeConfig."""

    @property
    def k(self) -> int: ...
    @property
    def n_latents(self) -> int: ...
    @property
    def matryoshka_widths(self) -> tuple[int, ...]: ...


class EncodedLike(Protocol):
    """What an architecture reads of an itda.sae.model.EncoderOutput."""

    @property
    def top_acts(self) -> Tensor: ...
    @property
    def top_indices(self) -> Tensor: ...


class SaeLike(Protocol):
    """What an architecture uses of an itda.sae.model.TopKSAE (a protocol: the model imports the registry)."""

    @property
    def cfg(self) -> SaeConfigLike: ...
    @property
    def threshold(self) -> Tensor: ...
    @property
    def b_dec(self) -> Tensor: ...
    def decode(self, top_acts: Tensor, top_indices: Tensor, *, bias: bool = True, units: float = 1.0) -> Tensor: ...
    def inference_threshold(self) -> float: ...


class Architecture:
    """The interface; each architecture module subclasses it once and the registry lists it once."""

    name: str = ""
    summary: str = ""  # one line, for help texts and messages
    uses_threshold: bool = False  # learns a global inference threshold (saved with the weights)
    saelens_architecture: str = ""

    def config_error(self, cfg: SaeConfigLike) -> tuple[str, str] | None:
        """(field, what is wrong) when cfg does not suit this architecture, else None."""
        if cfg.matryoshka_widths:
            return "matryoshka_widths", f"is for arch matryoshka_batchtopk, not {self.name}"
        return None

    def select_train(self, sae: SaeLike, pre_BF: Tensor, group: BatchGroup = SINGLE) -> tuple[Tensor, Tensor]:
        """The training selection; batch-wide rules reach over every rank's rows of `group`."""
        raise NotImplementedError

    def select_infer(self, sae: SaeLike, pre_BF: Tensor, units: float) -> tuple[Tensor, Tensor]:
        """The inference rule on pre-activations in `units` (a power of two)."""
        raise NotImplementedError

    def recon_loss(
        self, sae: SaeLike, x_BD: Tensor, enc: EncodedLike, fvu: Tensor, group: BatchGroup = SINGLE
    ) -> Tensor:
        """The reconstruction term of the training loss (default: the FVU itself); this rank's part of it."""
        return fvu

    def after_forward(self, sae: SaeLike, acts_BK: Tensor, rate: float, group: BatchGroup = SINGLE) -> None:
        """Update what the architecture learns besides the weights from a training batch's kept activations
        (every rank's, so the ranks stay equal)."""

    def saelens(self, sae: SaeLike) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
        """(cfg.json fields, extra tensors, metadata fields) of the SAELens inference form."""
        raise NotImplementedError
