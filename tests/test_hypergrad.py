"""PF2LoRA hypergradient against central finite differences in float64."""

from __future__ import annotations

import torch
from helpers import tiny_synthetic

from pf2lora_ray.algorithms import ALGORITHMS
from pf2lora_ray.algorithms.pf2lora import hypergradient, lower_level
from pf2lora_ray.client import build_adapted_model
from pf2lora_ray.tasks import task_for


def setup(beta: float, lower_steps: int = 1):
    cfg = tiny_synthetic(
        "synthetic.dim=6",
        "synthetic.personal_ranks=[1]",
        "synthetic.common_rank=1",
        "model.dtype=float64",
        "adapter.r=2",
        "adapter.r_personal=2",
        "adapter.alpha=2.0",
        f"pf2lora.lr_lower={beta}",
        f"pf2lora.lower_steps={lower_steps}",
        "data.batch_size=8",
    )
    task = task_for(cfg)
    model = build_adapted_model(cfg, task, ALGORITHMS["pf2lora"](cfg))
    data = task.client_data([0])[0]
    g = torch.Generator().manual_seed(3)
    rnd = lambda shape: 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)  # noqa: E731
    theta = {"proj.lora_A": rnd((2, 6)), "proj.lora_B": rnd((6, 2))}
    phi = {"proj.lora_C": rnd((2, 6)), "proj.lora_D": rnd((6, 2))}
    xis = [task.batch(data.train, torch.arange(i * 8, i * 8 + 8).numpy()) for i in range(3)]
    zeta = task.batch(data.train, torch.arange(40, 48).numpy())
    return cfg, task, model, theta, phi, xis, zeta


def outer_objective(task, model, theta, phi, xis, zeta, beta, steps):
    """F(theta, phi'(theta)) evaluated directly (no autograd through theta)."""
    phi_new = lower_level(task, model, theta, phi, iter(xis), steps, beta, 0.0, unrolled=False)
    with torch.no_grad():
        return float(task.loss(model, {**theta, **phi_new}, zeta))


def check_against_fd(beta: float, steps: int) -> None:
    _, task, model, theta, phi, xis, zeta = setup(beta, steps)
    _, h, _ = hypergradient(task, model, theta, phi, iter(xis), zeta, steps, beta, unrolled=True)
    eps = 1e-6
    for name, value in theta.items():
        fd = torch.zeros_like(value)
        for i in range(value.numel()):
            plus, minus = value.clone(), value.clone()
            plus.view(-1)[i] += eps
            minus.view(-1)[i] -= eps
            f_plus = outer_objective(
                task, model, {**theta, name: plus}, phi, xis, zeta, beta, steps
            )
            f_minus = outer_objective(
                task, model, {**theta, name: minus}, phi, xis, zeta, beta, steps
            )
            fd.view(-1)[i] = (f_plus - f_minus) / (2 * eps)
        rel = (h[name] - fd).norm() / fd.norm()
        assert rel < 1e-6, f"{name}: relative error {rel:.2e}"


def test_unrolled_hypergradient_matches_finite_differences():
    check_against_fd(beta=0.05, steps=1)


def test_unrolled_through_several_lower_steps_matches_finite_differences():
    check_against_fd(beta=0.05, steps=3)


def test_second_order_term_is_nonzero_when_beta_positive():
    _, task, model, theta, phi, xis, zeta = setup(0.05)
    _, h_unrolled, _ = hypergradient(
        task, model, theta, phi, iter(xis), zeta, 1, 0.05, unrolled=True
    )
    _, h_first, _ = hypergradient(task, model, theta, phi, iter(xis), zeta, 1, 0.05, unrolled=False)
    diff = sum((h_unrolled[k] - h_first[k]).norm() ** 2 for k in theta) ** 0.5
    scale = sum(h_first[k].norm() ** 2 for k in theta) ** 0.5
    assert diff / scale > 1e-4


def test_hypergradient_reduces_to_plain_gradient_at_beta_zero():
    _, task, model, theta, phi, xis, zeta = setup(0.0)
    _, h_unrolled, phi_new = hypergradient(task, model, theta, phi, iter(xis), zeta, 1, 0.0)
    _, h_first, _ = hypergradient(task, model, theta, phi, iter(xis), zeta, 1, 0.0, unrolled=False)
    for k in theta:
        torch.testing.assert_close(h_unrolled[k], h_first[k], rtol=0, atol=1e-14)
    for k in phi:
        torch.testing.assert_close(phi_new[k], phi[k])
