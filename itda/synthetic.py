"""Deterministic synthetic activations: sparse non-negative mixtures of Zipf-distributed features.

Used by the demo, tests and benchmarks where no model is involved. Each row is the sum of
`active` features (chosen with Zipf(s) frequencies, log-normal magnitudes) plus isotropic noise.
"""

from __future__ import annotations

import torch

from itda.activations.files import ActivationSet


def synthetic_with_features(
    n_tokens: int,
    d: int,
    *,
    n_features: int = 4096,
    active: int = 8,
    zipf: float = 1.1,
    noise: float = 0.05,
    context: int = 128,
    seed: int = 0,
) -> tuple[ActivationSet, torch.Tensor]:
    """The activations and the true unit features [n_features, d] they are made of."""
    gen = torch.Generator().manual_seed(seed)
    feats_FD = torch.randn(n_features, d, generator=gen)
    feats_FD /= feats_FD.norm(dim=1, keepdim=True)
    probs_F = 1.0 / torch.arange(1, n_features + 1, dtype=torch.float64) ** zipf
    idx_TA = torch.multinomial(probs_F.float(), n_tokens * active, replacement=True, generator=gen).view(
        n_tokens, active
    )
    mag_TA = torch.exp(0.5 * torch.randn(n_tokens, active, generator=gen))
    acts_TD = torch.einsum("ta,tad->td", mag_TA, feats_FD[idx_TA])
    acts_TD += noise * torch.randn(n_tokens, d, generator=gen) * acts_TD.norm(dim=1, keepdim=True) / d**0.5
    rows = torch.arange(n_tokens)
    refs = torch.full((n_tokens, 5), -1, dtype=torch.int64)
    refs[:, 0] = rows // context
    refs[:, 1] = rows % context
    return ActivationSet(acts_TD.contiguous(), refs, source=f"synthetic(seed={seed})"), feats_FD


def synthetic_activations(n_tokens: int, d: int, **kwargs) -> ActivationSet:
    """Activations only (see synthetic_with_features for the keyword arguments)."""
    return synthetic_with_features(n_tokens, d, **kwargs)[0]
