"""Two-level LoRA: a frozen linear layer plus a shared and a personal low-rank update.

For a frozen weight W0 (m x n) the adapted layer computes (PF2LORA.md, Model)::

    W_k = W0 + s * B @ A + s~ * D_k @ C_k,    s = alpha / r,  s~ = alpha~ / r~

with A (r x n), B (m x r) shared across clients and C_k (r~ x n), D_k (m x r~)
personal to client k. A and C start random (``adapter.init``: Gaussian as in the
paper, or Kaiming-uniform as in LoRA), B and D start at zero, so a fresh
adapter reproduces the base model exactly.

Parameters are registered under the names ``lora_A``, ``lora_B``, ``lora_C``,
``lora_D`` of the wrapping module, so a model's adapter state is the name-keyed
dict of its ``named_parameters()`` ending in those suffixes. Training code does
not copy client state into the module: it passes name-keyed tensors through
:func:`torch.func.functional_call`, so one frozen model serves many clients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

SHARED_FACTORS = ("lora_A", "lora_B")
PERSONAL_FACTORS = ("lora_C", "lora_D")

# Default target suffixes per transformers model_type (PF2LORA.md: query and value).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "distilbert": ("q_lin", "v_lin"),
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"),
    "opt": ("q_proj", "v_proj"),
    "gpt_neox": ("query_key_value",),
    "synthetic": ("proj",),
}


def _in_out(base: nn.Module) -> tuple[int, int]:
    """(n_in, m_out) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight stored n x m)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":
        n, m = base.weight.shape
        return n, m
    raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and Conv1D")


class TwoLevelLoRALinear(nn.Module):
    """``base(x) + s * x A^T B^T + s~ * x C^T D^T`` around a frozen ``base`` layer.

    Args:
        base: the frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) to adapt.
        r: shared rank (> 0). r_personal: personal rank (0 = no personal level).
        alpha, alpha_personal: scalings s = alpha / r, s~ = alpha_personal / r_personal.
    """

    def __init__(
        self, base: nn.Module, r: int, r_personal: int, alpha: float, alpha_personal: float
    ) -> None:
        super().__init__()
        n, m = _in_out(base)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.r_personal = r, r_personal
        self.scaling = alpha / r
        self.scaling_personal = alpha_personal / r_personal if r_personal else 0.0
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, n, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(m, r, dtype=w.dtype, device=w.device))
        self.lora_C = nn.Parameter(torch.empty(r_personal, n, dtype=w.dtype, device=w.device))
        self.lora_D = nn.Parameter(torch.zeros(m, r_personal, dtype=w.dtype, device=w.device))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A, C ~ Kaiming-uniform(a=sqrt(5)) as in LoRA; B, D = 0."""
        with torch.no_grad():
            for p in (self.lora_A, self.lora_C):
                kaiming_uniform_(p, generator)
            self.lora_B.zero_()
            self.lora_D.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., n)
        out = self.base(x)  # (..., m)
        out = out + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling
        if self.r_personal:
            out = out + (x @ self.lora_C.T @ self.lora_D.T) * self.scaling_personal
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, r_personal={self.r_personal}, scaling={self.scaling:g}"


def kaiming_uniform_(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``nn.init.kaiming_uniform_(t, a=sqrt(5))`` with an explicit generator."""
    if t.numel() == 0:
        return t
    fan_in = t.shape[1]
    gain = math.sqrt(2.0 / (1 + 5.0))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    with torch.no_grad():
        u = torch.rand(t.shape, generator=generator, dtype=torch.float64)
        t.copy_((u * 2 - 1) * bound)
    return t


def inject_two_level_lora(
    model: nn.Module,
    targets: Iterable[str],
    r: int,
    r_personal: int,
    alpha: float,
    alpha_personal: float | None = None,
) -> list[str]:
    """Replace every module whose name ends with a target suffix by a two-level LoRA layer.

    ``alpha_personal`` None gives s~ = s (alpha~ = alpha * r_personal / r).

    Freezes every parameter of ``model`` first (callers unfreeze a head if they
    train one). Returns the qualified names of the adapted modules, sorted.

    Raises:
        ValueError: when no module matches, naming the suffixes tried.
    """
    targets = tuple(targets)
    if alpha_personal is None:  # s~ = s (PF2LORA.md, Model)
        alpha_personal = alpha * r_personal / r
    for p in model.parameters():
        p.requires_grad_(False)
    matches = [
        name
        for name, mod in model.named_modules()
        if name and name.split(".")[-1] in targets and not isinstance(mod, TwoLevelLoRALinear)
    ]
    if not matches:
        raise ValueError(f"adapter.targets {list(targets)} matched no module of the model")
    for name in matches:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, TwoLevelLoRALinear(base, r, r_personal, alpha, alpha_personal))
    return sorted(matches)


def lora_layers(model: nn.Module) -> dict[str, TwoLevelLoRALinear]:
    """Name -> adapted layer, in name order."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, TwoLevelLoRALinear)}
    return dict(sorted(layers.items()))


def factor_names(model: nn.Module, factors: Iterable[str]) -> list[str]:
    """Qualified parameter names of the given LoRA factors, sorted."""
    factors = tuple(factors)
    return sorted(
        f"{layer}.{f}"
        for layer, mod in lora_layers(model).items()
        for f in factors
        if getattr(mod, f).numel() > 0
    )


def gaussian_(
    t: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``t ~ N(0, std^2)`` drawn in float64 from ``generator`` (same values on every device)."""
    if t.numel() == 0:
        return t
    with torch.no_grad():
        t.copy_(torch.randn(t.shape, generator=generator, dtype=torch.float64) * std)
    return t


INITS = ("gaussian", "kaiming")


def init_factors(
    model: nn.Module,
    names: Iterable[str],
    generator: torch.Generator,
    init: str = "gaussian",
) -> dict[str, torch.Tensor]:
    """Fresh values for the named LoRA factors: A/C random, B/D zero.

    ``init="gaussian"`` (the paper's Algorithm 1) draws A and C from N(0, 1/r^2)
    with r the layer's shared rank, as PEFT's ``init_lora_weights="gaussian"``
    does for A; C uses the same std so that, with s~ = s, both levels start
    alike per unit parameter. ``init="kaiming"`` is LoRA's Kaiming-uniform(a=sqrt(5)).
    Draws in sorted name order from ``generator`` so the result depends only on
    the generator's seed, never on which process computes it.
    """
    if init not in INITS:
        raise ValueError(f"adapter.init: must be one of {list(INITS)}, got {init!r}")
    params = dict(model.named_parameters())
    layers = lora_layers(model)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(names):
        t = torch.zeros_like(params[name])
        if name.endswith(("lora_A", "lora_C")):
            if init == "gaussian":
                gaussian_(t, 1.0 / layers[name.rsplit(".", 1)[0]].r, generator)
            else:
                kaiming_uniform_(t, generator)
        out[name] = t
    return out
