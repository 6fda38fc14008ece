"""Two-level LoRA layer: exact base outputs at init, the update formula, state by name."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

from pf2lora_ray.lora import (
    TwoLevelLoRALinear,
    factor_names,
    inject_two_level_lora,
    lora_layers,
)


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return BertModel(cfg).eval()


def tiny_gpt2() -> GPT2Model:
    torch.manual_seed(0)
    return GPT2Model(
        GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    ).eval()


@pytest.mark.parametrize(
    ("build", "targets"), [(tiny_bert, ("query", "value")), (tiny_gpt2, ("c_attn",))]
)
def test_init_reproduces_base_model_exactly(build, targets):
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    base = build()
    with torch.no_grad():
        expected = base(input_ids=ids).last_hidden_state
    adapted = build()
    names = inject_two_level_lora(adapted, targets, r=4, r_personal=2, alpha=8.0)
    assert len(names) == 2 * len(targets)  # both layers of the model, every target
    with torch.no_grad():
        got = adapted(input_ids=ids).last_hidden_state
    assert torch.equal(got, expected)


def test_forward_equals_two_level_weight_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(5, 3, bias=True)
    layer = TwoLevelLoRALinear(base, r=2, r_personal=1, alpha=4.0, alpha_personal=3.0)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B, layer.lora_C, layer.lora_D):
            p.normal_()
    x = torch.randn(4, 5)
    w = (
        base.weight
        + (4.0 / 2) * layer.lora_B @ layer.lora_A
        + (3.0 / 1) * layer.lora_D @ layer.lora_C
    )
    torch.testing.assert_close(layer(x), x @ w.T + base.bias)


def test_base_weights_frozen_and_factor_names_sorted():
    model = tiny_bert()
    inject_two_level_lora(model, ("query", "value"), r=2, r_personal=1, alpha=2.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n}
    names = factor_names(model, ("lora_A", "lora_B"))
    assert names == sorted(names) and len(names) == 2 * len(lora_layers(model))
    assert all(n.endswith(("lora_A", "lora_B")) for n in names)


def test_unknown_target_is_an_error_naming_it():
    with pytest.raises(ValueError, match="nope"):
        inject_two_level_lora(tiny_bert(), ("nope",), r=2, r_personal=1, alpha=2.0)
