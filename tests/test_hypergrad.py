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
        "pf2lora.estimator=shared_batches",
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


# ----------------------------------------------------------- the paper's estimator


def paper_h(task, model, theta, phi, batches, beta, hvp="autograd", fd_eps=1e-3):
    from pf2lora_ray.algorithms.pf2lora import PI, XI, XI_TILDE, ZETA, paper_step

    named = dict(zip((PI, XI, XI_TILDE, ZETA), batches, strict=True))
    return paper_step(task, model, theta, phi, named, beta, True, hvp, fd_eps)


def test_paper_estimator_equals_exact_hypergradient_on_one_batch():
    """Four copies of one batch: Algorithm 1's h is d/dx F(x, y+(x); B), checked by FD."""
    _, task, model, theta, phi, xis, _ = setup(0.05)
    batch = xis[0]
    _, h, phi_new = paper_h(task, model, theta, phi, [batch] * 4, 0.05)
    _, h_exact, phi_exact = hypergradient(task, model, theta, phi, iter([batch]), batch, 1, 0.05)
    for k in theta:
        rel = (h[k] - h_exact[k]).norm() / h_exact[k].norm()
        assert rel < 1e-10, f"{k}: relative difference {rel:.2e}"
    for k in phi:
        torch.testing.assert_close(phi_new[k], phi_exact[k], rtol=0, atol=1e-14)
    # ... and the exact hypergradient itself against central differences (same batch twice).
    eps = 1e-6
    for name, value in theta.items():
        fd = torch.zeros_like(value)
        for i in range(value.numel()):
            shifted = []
            for sign in (1, -1):
                v = value.clone()
                v.view(-1)[i] += sign * eps
                shifted.append(
                    outer_objective(task, model, {**theta, name: v}, phi, [batch], batch, 0.05, 1)
                )
            fd.view(-1)[i] = (shifted[0] - shifted[1]) / (2 * eps)
        assert (h[name] - fd).norm() / fd.norm() < 1e-6


def test_paper_estimator_takes_the_mixed_term_at_the_old_y_on_zeta():
    """h = grad_x F(y+; xi) - beta * H_xy(y; zeta) v(y+; xi~), each piece by central FD."""
    _, task, model, theta, phi, xis, zeta = setup(0.05)
    pi, xi, xi_t = xis
    beta, eps = 0.05, 1e-6
    _, h, _ = paper_h(task, model, theta, phi, [pi, xi, xi_t, zeta], beta)
    from pf2lora_ray.algorithms.base import loss_and_grads

    _, g_y = loss_and_grads(task, model, {**theta, **phi}, sorted(phi), pi)
    y_new = {k: phi[k] - beta * g_y[k] for k in phi}
    _, g_x = loss_and_grads(task, model, {**theta, **y_new}, sorted(theta), xi)
    _, v = loss_and_grads(task, model, {**theta, **y_new}, sorted(phi), xi_t)
    # H_xy(y; zeta) v = d/dt grad_x F(x, y + t v; zeta) at t = 0, by central differences.
    plus = {k: phi[k] + eps * v[k] for k in phi}
    minus = {k: phi[k] - eps * v[k] for k in phi}
    _, gp = loss_and_grads(task, model, {**theta, **plus}, sorted(theta), zeta)
    _, gm = loss_and_grads(task, model, {**theta, **minus}, sorted(theta), zeta)
    for k in theta:
        expected = g_x[k] - beta * (gp[k] - gm[k]) / (2 * eps)
        assert (h[k] - expected).norm() / expected.norm() < 1e-6, k


def test_finite_difference_hvp_matches_autograd():
    _, task, model, theta, phi, xis, zeta = setup(0.05)
    batches = [*xis, zeta]
    _, h_auto, y_auto = paper_h(task, model, theta, phi, batches, 0.05, "autograd")
    _, h_fd, y_fd = paper_h(task, model, theta, phi, batches, 0.05, "finite_difference")
    for k in theta:
        rel = (h_fd[k] - h_auto[k]).norm() / h_auto[k].norm()
        assert rel < 1e-4, f"{k}: relative difference {rel:.2e}"
    for k in phi:
        torch.testing.assert_close(y_fd[k], y_auto[k], rtol=0, atol=0)


def test_finite_difference_hvp_matches_autograd_in_float32_on_a_tiny_bert(tmp_path):
    """The FD product in float32 on a transformer: close to double backward despite cancellation."""
    from test_export import tiny_cfg

    from pf2lora_ray.algorithms.base import loss_and_grads
    from pf2lora_ray.algorithms.pf2lora import mixed_hvp
    from pf2lora_ray.client import ClientHost

    host = ClientHost(tiny_cfg(tmp_path, "tiny-bert", "glue"), [0])
    g = torch.Generator().manual_seed(0)
    jitter = lambda t: t + 0.05 * torch.randn(t.shape, generator=g)  # noqa: E731
    theta = {k: jitter(torch.from_numpy(v)) for k, v in host.initial_shared().items()}
    phi = {k: jitter(v) for k, v in host.personal_state(0).items()}
    batch = host.task.batch(host.data[0].train, torch.arange(8).numpy())
    _, v = loss_and_grads(host.task, host.model, {**theta, **phi}, sorted(phi), batch)
    auto = mixed_hvp(host.task, host.model, theta, phi, v, batch, "autograd")
    fd = mixed_hvp(host.task, host.model, theta, phi, v, batch, "finite_difference", 1e-2)
    num = sum(float((auto[k] - fd[k]).norm() ** 2) for k in theta) ** 0.5
    den = sum(float(auto[k].norm() ** 2) for k in theta) ** 0.5
    assert den > 0 and num / den < 1e-2, num / den


def test_first_order_ablation_drops_only_the_mixed_term():
    from pf2lora_ray.algorithms.base import loss_and_grads
    from pf2lora_ray.algorithms.pf2lora import PI, XI, XI_TILDE, ZETA, paper_step

    _, task, model, theta, phi, xis, zeta = setup(0.05)
    named = dict(zip((PI, XI, XI_TILDE, ZETA), [*xis, zeta], strict=True))
    _, h, y_new = paper_step(task, model, theta, phi, named, 0.05, second_order=False)
    _, g_x = loss_and_grads(task, model, {**theta, **y_new}, sorted(theta), xis[1])
    for k in theta:
        torch.testing.assert_close(h[k], g_x[k], rtol=0, atol=0)


def test_chunked_autograd_hvp_equals_the_whole_batch_product():
    from pf2lora_ray.algorithms.base import loss_and_grads
    from pf2lora_ray.algorithms.pf2lora import mixed_hvp

    _, task, model, theta, phi, xis, zeta = setup(0.05)
    _, v = loss_and_grads(task, model, {**theta, **phi}, sorted(phi), xis[0])
    whole = mixed_hvp(task, model, theta, phi, v, zeta, "autograd", chunks=1)
    for chunks in (2, 3, 8):
        parts = mixed_hvp(task, model, theta, phi, v, zeta, "autograd", chunks=chunks)
        for k in theta:
            torch.testing.assert_close(parts[k], whole[k], rtol=1e-12, atol=1e-14)


def test_split_batch_weights_slices_by_the_tasks_loss_weight():
    from pf2lora_ray.algorithms.pf2lora import split_batch

    class TokenMean:  # a task whose loss averages over non-ignored labels
        def loss_weight(self, batch):
            return float((batch["labels"] != -100).sum())

    labels = torch.tensor([[1, 2, 3], [4, -100, -100], [5, 6, -100], [7, -100, -100]])
    batch = {"labels": labels, "input_ids": labels.clamp(min=0), "note": "kept"}
    parts = split_batch(TokenMean(), batch, 2)
    assert [w for w, _ in parts] == [4 / 7, 3 / 7]
    assert parts[0][1]["labels"].shape == (2, 3) and parts[1][1]["note"] == "kept"
    plain = split_batch(object(), batch, 3)  # no loss_weight: a mean over rows
    assert [w for w, _ in plain] == [0.25, 0.5, 0.25]  # rows 0 | 1-2 | 3
