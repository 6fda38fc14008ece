"""Causal-LM mechanics shared by the generation tasks: the target-token loss and decoding.

Both run a frozen Hugging Face causal LM with a client's parameters substituted
by :func:`torch.func.functional_call`, so one model serves many clients and is
never modified.

The loss (:func:`token_losses`) computes logits only where they are scored.
A causal LM's head maps every position's hidden state to the vocabulary
(49,152 entries for SmolLM2, 50,257 for GPT-2), and on a prompt-plus-text row
only the positions that predict a text token enter the loss. With
``model.lm_logits: targets`` (the default) the backbone's last hidden states
are gathered at those positions, (n_targets, hidden), before the head, so the
head's matrix product, the log-softmax and their backward passes shrink by
the share of prompt and padding positions. ``all`` computes logits at every
position, as the model's own ``forward`` does (the reference; a bench
baseline). Both give the same loss and gradients (``tests/test_tasks_lm.py``).

Decoding (:func:`generate`) calls Hugging Face ``generate``, which is not a
function of explicit parameters, as the ``forward`` of a thin wrapper module:
the parameters are swapped in for exactly that call and swapped back after.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pf2lora_ray.config import ConfigError
from pf2lora_ray.tasks.base import Batch, Params
from pf2lora_ray.tasks.text import pad, param_device

LM_LOGITS = ("targets", "all")


class _TargetLogits(nn.Module):
    """Logits at chosen positions only: backbone, gather, then the LM head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, where: torch.Tensor
    ) -> torch.Tensor:
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out.last_hidden_state[:, :-1]  # (batch, seq - 1, hidden): position t predicts t+1
        return self.model.get_output_embeddings()(hidden[where])  # (n_targets, vocab)


class _Generate(nn.Module):
    """``model.generate`` as a forward, so functional_call can substitute parameters for it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(**kwargs)


def check_target_logits(model: nn.Module) -> None:
    """Raise ConfigError unless the model's logits are ``lm_head(last hidden state)``.

    True of GPT-2, Llama (SmolLM2), Mistral, Qwen2, OPT and most causal LMs; not
    of models that scale or soft-cap their logits after the head (Gemma 2,
    Cohere), nor of a model without a separate backbone.
    """
    config = getattr(model, "config", None)
    post = [k for k in ("final_logit_softcapping", "logit_scale") if getattr(config, k, None)]
    if model.base_model is model or model.get_output_embeddings() is None or post:
        raise ConfigError(
            f"model.lm_logits: targets gathers hidden states before the LM head, which "
            f"{type(model).__name__} does not allow ({post or 'no separate backbone and head'}); "
            "set model.lm_logits=all"
        )


def _shifted_targets(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels of positions 1.., mask of the positions that predict a target token)."""
    labels = batch["labels"].to(device)[:, 1:]  # token t+1 is predicted at position t
    return labels, labels != -100


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """bfloat16 logits in float32 for the softmax; float32/float64 as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def token_losses(
    model: nn.Module, params: Params, batch: Batch, lm_logits: str = "targets"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the target tokens of ``batch``, and their count.

    Args:
        model: a frozen causal LM (with adapters injected).
        params: name-keyed parameters substituted for the call.
        batch: ``input_ids``, ``attention_mask`` and ``labels`` (batch, seq); labels
            are -100 where a token is not scored (prompt, padding).
        lm_logits: ``targets`` (logits only at scored positions) or ``all``.
    """
    device = param_device(dict(params))
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    labels, where = _shifted_targets(batch, device)
    if lm_logits == "targets":
        wrapper = _TargetLogits(model)
        swapped = {f"model.{k}": v for k, v in params.items()}
        logits = functional_call(wrapper, swapped, (), {**inputs, "where": where}, strict=False)
        total = F.cross_entropy(_at_least_float32(logits), labels[where], reduction="sum")
    else:
        logits = functional_call(model, dict(params), (), inputs, strict=False).logits
        logits = _at_least_float32(logits[:, :-1])  # (batch, seq - 1, vocab)
        total = F.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum"
        )
    return total, where.sum()


def target_count(batch: Batch) -> float:
    """How many target tokens a batch's mean loss averages over (weights its slices)."""
    return float((batch["labels"][:, 1:] != -100).sum())


def generate(
    model: nn.Module,
    params: Params,
    prompts: Sequence[list[int]],
    tokenizer: Any,
    max_new_tokens: int,
    num_beams: int = 1,
    batch_size: int = 16,
) -> list[str]:
    """Decoded continuations of ``prompts`` (token ids) by ``model`` run with ``params``.

    Greedy (``num_beams`` 1) or beam search, at most ``max_new_tokens`` new tokens,
    stopping at the tokenizer's end-of-text token; prompts are left-padded in
    batches of ``batch_size``. Returns stripped text without special tokens.
    """
    wrapper = _Generate(model)
    swapped = {f"model.{k}": v for k, v in params.items()}
    device = param_device(dict(params)) if params else next(model.parameters()).device

    def call(**kwargs: Any) -> torch.Tensor:
        return functional_call(wrapper, swapped, (), kwargs, strict=False)

    return decode(call, prompts, tokenizer, max_new_tokens, num_beams, batch_size, device)


def decode(
    call: Callable[..., torch.Tensor],
    prompts: Sequence[list[int]],
    tokenizer: Any,
    max_new_tokens: int,
    num_beams: int,
    batch_size: int,
    device: torch.device,
) -> list[str]:
    """Batched deterministic decoding through ``call`` (a ``generate``-like function)."""
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [
            {"input_ids": list(p), "attention_mask": [1] * len(p)}
            for p in prompts[start : start + batch_size]
        ]
        inputs = {k: v.to(device) for k, v in pad(rows, tokenizer.pad_token_id, "left").items()}
        out = call(
            **inputs,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = out[:, inputs["input_ids"].shape[1] :]  # (batch, new tokens)
        texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return texts
