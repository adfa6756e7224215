"""Purity statistics against a direct computation on projections with known neuron cosines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipbench.purity import neuron_overlap, purity_metrics


def _projection() -> torch.Tensor:
    """An (in=3, embed=3) projection whose neurons have pairwise cosines 0, 0.5 and -0.5."""
    neurons = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, -0.5, math.sqrt(0.5)]], dtype=torch.float64)
    return (neurons * torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)).T  # neuron norms must not matter


def test_metrics_match_a_direct_computation_without_and_with_the_diagonal():
    projection = _projection()
    ours = purity_metrics(projection)
    off = np.array([0.0, 0.5, 0.0, -0.5, 0.5, -0.5])  # the six off-diagonal entries, row by row
    assert ours["avg_abs_cos"] == pytest.approx(np.abs(off).mean())
    assert ours["max_abs_cos"] == pytest.approx(0.5)
    assert ours["median_abs_cos"] == pytest.approx(np.median(np.abs(off)))
    assert ours["std_abs_cos"] == pytest.approx(np.abs(off).std())
    assert ours["avg_cos"] == pytest.approx(off.mean())
    per_neuron = 1 / np.array([0.25, 0.25, 0.5])  # mean |cos| to the two others
    assert ours["purity_mean"] == pytest.approx(per_neuron.mean())
    assert ours["purity_std"] == pytest.approx(per_neuron.std())

    # The reference: the full 3x3 matrix with zeros on the diagonal.
    full = np.array([[0, 0, 0.5], [0, 0, -0.5], [0.5, -0.5, 0]])
    reference = purity_metrics(projection, include_diagonal=True)
    assert reference["avg_abs_cos"] == pytest.approx(np.abs(full).mean())
    assert reference["avg_abs_cos"] == pytest.approx(ours["avg_abs_cos"] * 2 / 3)  # the (n-1)/n bias
    assert reference["median_abs_cos"] == pytest.approx(np.median(np.abs(full)))
    assert reference["std_abs_cos"] == pytest.approx(np.abs(full).std())
    assert reference["purity_mean"] == pytest.approx((1 / np.abs(full).mean(axis=1)).mean())


def test_orthogonal_neurons_are_perfectly_pure_and_overlap_ranks_neurons():
    q, _ = torch.linalg.qr(torch.randn(16, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert purity_metrics(q)["avg_abs_cos"] == pytest.approx(0.0, abs=1e-12)
    projection = q.clone()
    projection[:, 1] = q[:, 0] + 0.1 * q[:, 1]  # neuron 1 nearly duplicates neuron 0
    overlap = neuron_overlap(projection)
    assert set(overlap.topk(2).indices.tolist()) == {0, 1}
    assert overlap[2:].abs().max() < 1e-6


def test_a_vector_is_not_a_projection():
    with pytest.raises(ValueError, match="embed_dim >= 2"):
        purity_metrics(torch.randn(5, 1))
