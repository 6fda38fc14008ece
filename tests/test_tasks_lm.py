"""Causal-LM loss with logits only at target positions equals the all-position loss."""

from __future__ import annotations

import pytest
import torch

from pf2lora_ray.config import ConfigError, ModelConfig
from pf2lora_ray.lora import factor_names, inject_two_level_lora, lora_layers
from pf2lora_ray.models import load_model
from pf2lora_ray.tasks import lm


def lm_with_lora(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny random causal LM in float64 with two-level LoRA on its attention, B/D non-zero."""
    torch.manual_seed(0)
    model, _, family = load_model(ModelConfig(name=name, dtype="float64"), "causal_lm")
    targets = {"gpt2": ("c_attn",), "llama": ("q_proj", "v_proj")}[family]
    inject_two_level_lora(model, targets, r=4, r_personal=2, alpha=8.0)
    names = factor_names(model, ("lora_A", "lora_B", "lora_C", "lora_D"))
    gen = torch.Generator().manual_seed(1)
    current = dict(model.named_parameters())
    params = {
        n: (0.1 * torch.randn(current[n].shape, generator=gen, dtype=torch.float64))
        .requires_grad_(True)
        for n in names
    }
    assert lora_layers(model)
    return model, params


def batch_with_prompts_and_padding() -> dict[str, torch.Tensor]:
    """3 rows: prompts of 4-6 tokens (label -100), targets after, right padding (mask 0)."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(7, 263, (3, 14), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for row, (prompt, length) in enumerate([(4, 14), (6, 11), (5, 9)]):
        labels[row, :prompt] = -100
        labels[row, length:], mask[row, length:], ids[row, length:] = -100, 0, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_target_logits_give_the_same_loss_gradient_and_mixed_term(name):
    model, params = lm_with_lora(name)
    batch = batch_with_prompts_and_padding()
    x = [v for k, v in params.items() if k.endswith(("lora_A", "lora_B"))]
    y = [v for k, v in params.items() if k.endswith(("lora_C", "lora_D"))]
    out = {}
    for mode in lm.LM_LOGITS:
        total, count = lm.token_losses(model, params, batch, mode)
        loss = total / count
        g_y = torch.autograd.grad(loss, y, create_graph=True)
        # PF2LoRA's mixed term grad_x <grad_y F, v> needs the double backward to agree too.
        inner = sum((g * torch.ones_like(g)).sum() for g in g_y)
        mixed = torch.autograd.grad(inner, x)
        out[mode] = (float(loss.detach()), int(count), [g.detach() for g in g_y], mixed)
    assert out["targets"][1] == out["all"][1] == lm.target_count(batch) == 10 + 5 + 4
    assert out["targets"][0] == pytest.approx(out["all"][0], rel=1e-12)
    for a, b in zip(out["targets"][2] + list(out["targets"][3]),
                    out["all"][2] + list(out["all"][3]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any(float(g.abs().max()) > 0 for g in out["targets"][3])  # the check can fail


def test_target_logits_refuse_a_model_that_rescales_its_logits():
    model, _ = lm_with_lora("tiny-gpt2")
    lm.check_target_logits(model)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="model.lm_logits=all"):
        lm.check_target_logits(model)
