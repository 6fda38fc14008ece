"""Effective rank from factors equals the rank from the full matrix's SVD."""

from __future__ import annotations

import pytest
import torch

from pf2lora_ray.rank import energy_rank, factored_singular_values, threshold_rank, update_factors


@pytest.mark.parametrize("seed", range(5))
def test_factored_singular_values_match_full_svd(seed):
    g = torch.Generator().manual_seed(seed)
    m, n, r, rp = 40, 30, 4, 3
    a, b = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((r, n), (m, r)))
    c, d = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((rp, n), (m, rp)))
    # Make the last direction weak so energy and threshold ranks differ from r + rp.
    d[:, -1] *= 1e-3
    u, v = update_factors(a, b, c, d, scaling=2.0, scaling_personal=0.5)
    full = 2.0 * b @ a + 0.5 * d @ c
    s_full = torch.linalg.svdvals(full)[: r + rp]
    s = factored_singular_values(u, v)
    torch.testing.assert_close(s, s_full, rtol=1e-9, atol=1e-9)
    for tau in (0.9, 0.99, 0.999999):
        assert energy_rank(s, tau) == energy_rank(torch.linalg.svdvals(full), tau)
    assert threshold_rank(s, 0.05) == threshold_rank(torch.linalg.svdvals(full), 0.05)


def test_energy_and_threshold_rank_hand_values():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 0.5) == 1  # 9/14 = 0.64
    assert energy_rank(s, 0.9) == 2  # 13/14 = 0.93
    assert energy_rank(s, 0.99) == 3
    assert threshold_rank(s, 0.5) == 2  # 3 and 2 exceed 1.5
    assert energy_rank(torch.zeros(3)) == 0 and threshold_rank(torch.zeros(3)) == 0


def test_rank_of_known_low_rank_update():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 20, generator=g), torch.randn(20, 2, generator=g)
    c, d = torch.randn(2, 20, generator=g), torch.zeros(20, 2)  # personal level off
    s = factored_singular_values(*update_factors(a, b, c, d, 1.0, 1.0))
    assert energy_rank(s) == 2 and threshold_rank(s) == 2


def test_a_diverged_update_has_no_rank_instead_of_crashing():
    u = torch.ones(6, 3, dtype=torch.float64)
    v = torch.ones(3, 5, dtype=torch.float64)
    u[0, 0] = float("nan")
    s = factored_singular_values(u, v)
    assert s.shape == (3,) and torch.isnan(s).all()
    assert energy_rank(s) is None and threshold_rank(s) is None
