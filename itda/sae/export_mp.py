"""A dictionary as SAELens's `matching_pursuit` SAE: tied (W_enc = W_dec.T), b_dec = 0.

SAELens encodes r = x - b_dec step by step: j = argmax relu(r @ W_dec.T), a_j += relu(<r, W_dec[j]>),
r -= that * W_dec[j]; it stops after max_iterations steps, once |r| < residual_threshold (checked
only when > 0), or, with stop_on_duplicate_support, after a step that leaves the set of non-zero
latents unchanged (that step's value is still added). ITDA's MP picks argmax |<r, a_j>| with the
signed coefficient <r, a_j>, for exactly k steps.

- signed (default): W_dec = [atoms; -atoms], 2N latents. The largest relu over the ±atoms is the
  largest |correlation| (the same argmax, ties to the lower index), so with residual_threshold = 0
  and stop_on_duplicate_support off SAELens runs ITDA's k MP steps: latent j < N sums atom j's
  positive picks, N + j its negative ones, and ITDA's dense code is acts[:, :N] - acts[:, N:].
- plain: W_dec = atoms, N latents: non-negative MP; a step whose correlations are all <= 0 adds
  nothing, so it reconstructs no better than ITDA's MP in general.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from itda.atomic import atomic_dir
from itda.errors import ItdaInputError
from itda.sae.io import SAELENS_WEIGHTS, saelens_cfg

if TYPE_CHECKING:
    from itda.dictionary import Dictionary


def mp_decoder(atoms: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """SAELens's W_dec for atoms [N, d]: float32 [atoms; -atoms] [2N, d] (signed) or atoms [N, d]."""
    w = atoms.detach().to("cpu", torch.float32)
    return torch.cat([w, -w]).contiguous() if signed else w.contiguous()


def signed_codes(acts: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """ITDA's dense MP codes [B, N] from a signed export's SAELens latents [B, 2N]."""
    if acts.shape[-1] != 2 * n_atoms:
        raise ItdaInputError(f"a signed export of {n_atoms} atoms has {2 * n_atoms} latents, got {acts.shape[-1]}")
    return acts[..., :n_atoms] - acts[..., n_atoms:]


def _mp_cfg(
    dictionary: Dictionary, k: int, signed: bool, residual_threshold: float, stop_on_dup: bool, context: int
) -> dict:
    n, m = len(dictionary), dictionary.meta
    layout = (
        "j < N: +atom j, N + j: -atom j; codes = acts[:, :N] - acts[:, N:]"
        if signed
        else "latent j: atom j, non-negative coefficients only"
    )
    return saelens_cfg(
        "matching_pursuit",
        dictionary.d,
        2 * n if signed else n,
        head={"residual_threshold": residual_threshold, "max_iterations": k, "stop_on_duplicate_support": stop_on_dup},
        tail={},
        model=m.model,
        hookpoint=m.hookpoint,
        context_size=context,
        metadata={
            "itda_dictionary": {"atoms": n, "k": k, "signed": signed, "latents": layout, "hookpoint": m.hookpoint}
        },
    )


def export_saelens_mp(
    dictionary: Dictionary,
    out: str | os.PathLike,
    *,
    k: int | None = None,
    signed: bool = True,
    residual_threshold: float = 0.0,
    stop_on_duplicate_support: bool = False,
    context_size: int = 128,
) -> Path:
    """Write dictionary as a folder `sae_lens.SAE.load_from_disk` loads as MatchingPursuitSAE; returns out.

    k: max_iterations (default the dictionary's k). With the defaults (signed, residual_threshold 0,
    no duplicate-support stop) SAELens's encoding is ITDA's k-step MP (see the module docstring).
    """
    n = len(dictionary)
    if n == 0:
        raise ItdaInputError("the dictionary has no atoms")
    k = dictionary.encoding_k(k)
    threshold = float(residual_threshold)
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ItdaInputError(f"residual_threshold must be a finite number >= 0, got {residual_threshold!r}")
    cfg = _mp_cfg(dictionary, k, signed, threshold, bool(stop_on_duplicate_support), context_size)
    tensors = {"W_dec": mp_decoder(dictionary.atoms, signed), "b_dec": torch.zeros(dictionary.d)}
    out = Path(out)
    with atomic_dir(out, replace_if="cfg.json") as tmp:
        save_file(tensors, str(tmp / SAELENS_WEIGHTS))
        (tmp / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return out
