"""Client code: one frozen base model serving the personal state of many clients.

:class:`ClientHost` is plain Python, used as is by the in-process backend and
wrapped thinly by a Ray actor (:mod:`pf2lora_ray.runtime.ray_backend`). It builds
the base model once, keeps each of its clients' personal state phi_k between
rounds, and for a round returns ONE pre-summed weighted update for all its
clients, so the driver receives one message per host, not per client.

Shared state crosses process boundaries as name-keyed float32 numpy arrays
(zero-copy in Ray's object store); personal state never leaves the host except
into a checkpoint or to another host. It lives in a
:class:`~pf2lora_ray.state_store.StateStore`, which keeps at most
``runtime.state_memory_mb`` of it in memory and spills the rest to disk; with
that bound set, a client's data is also built only while it is trained or
evaluated (:class:`~pf2lora_ray.data.cache.ClientDataCache`), so memory does not
grow with the clients.

A host given its clients' rows of the data (:class:`~pf2lora_ray.tasks.base.Rows`,
drawn once by the driver's data check) builds their data from those rows only; a
client handed to another host takes its rows along (:meth:`ClientHost.hand_over`).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import psutil
import torch

from pf2lora_ray import seeds
from pf2lora_ray.algorithms import ALGORITHMS
from pf2lora_ray.algorithms.base import ClientRound, RoundContext, Tensors
from pf2lora_ray.config import Config
from pf2lora_ray.data.cache import ClientDataCache
from pf2lora_ray.lora import (
    DEFAULT_TARGETS,
    PERSONAL_FACTORS,
    SHARED_FACTORS,
    init_factors,
    inject_two_level_lora,
    lora_layers,
)
from pf2lora_ray.rank import energy_rank, factored_singular_values, threshold_rank, update_factors
from pf2lora_ray.state_store import StateStore
from pf2lora_ray.tasks import task_for
from pf2lora_ray.tasks.base import ClientRows

Arrays = dict[str, np.ndarray]


class Handover(NamedTuple):
    """Clients moving to another host: their personal state (none yet: absent) and rows."""

    states: dict[int, Arrays]
    rows: ClientRows | None


@dataclass
class TrainResult:
    """One host's share of a round: sum_k w_k * x_k (float64), sum_k w_k, per-client rows."""

    summed: Arrays
    weight: float
    clients: list[int]
    rows: list[dict] = field(default_factory=list)
    compute_s: float = 0.0
    peak_rss_mb: float = 0.0
    dropped: list[int] = field(default_factory=list)  # lost after faults.max_retries retries
    faults: list[str] = field(default_factory=list)  # actor failures met (and how handled)
    # Each client's local update in CPU seconds of this process (steadier than wall time
    # on a shared machine; the placement's measure of a client's cost).
    client_s: dict[int, float] = field(default_factory=dict)
    # Personal state written to / read back from the hosts' spill folders (state_store).
    spilled_bytes: int = 0
    read_bytes: int = 0


@dataclass
class EvalResult:
    """Per-client metric rows and effective-rank rows of one evaluation."""

    rows: list[dict] = field(default_factory=list)
    ranks: list[dict] = field(default_factory=list)
    compute_s: float = 0.0
    peak_rss_mb: float = 0.0
    dropped: list[int] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    # True when the rows were handed to the driver's callbacks chunk by chunk as they
    # were scored (runtime.eval_chunk): ``ranks`` is then empty, ``rows`` still whole.
    streamed: bool = False
    spilled_bytes: int = 0
    read_bytes: int = 0
    cpu_s: float = 0.0  # CPU seconds of the hosts' processes (summed), steadier than compute_s


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """Current resident set size of this process, in MB (unlike the peak, it can shrink)."""
    return psutil.Process().memory_info().rss / 2**20


def build_adapted_model(cfg: Config, task, algorithm) -> torch.nn.Module:
    """The task's frozen base model with two-level LoRA on the configured targets.

    The global torch seed is fixed first so a randomly initialised task head is
    the same in every process that builds the model.
    """
    torch.manual_seed(seeds.derive(cfg.seed, seeds.MODEL_INIT))
    model = task.build_model()
    r, r_personal = algorithm.ranks()
    targets = cfg.adapter.targets or DEFAULT_TARGETS.get(task.family, ())
    inject_two_level_lora(
        model, targets, r, r_personal, cfg.adapter.alpha, cfg.adapter.alpha_personal
    )
    # Dropout off: every random draw must come from (seed, round, client), and
    # dropout would draw from the process-global generator.
    return model.eval()


class ClientHost:
    """Frozen model + data + personal state for the clients ``client_ids``.

    Args:
        cfg: the run's config.
        client_ids: the clients this host serves, for the whole run.
        device: where the model and adapters live (default: CUDA if visible and
            the config asks for GPUs, else CPU).
        rows: the rows of (at least) ``client_ids`` (the driver's
            ``Task.client_rows``): the host then builds its clients' data from them
            and never draws the partition. None: the task draws it, or generates the
            data from (seed, client).
    """

    def __init__(
        self,
        cfg: Config,
        client_ids: Sequence[int],
        device: str | None = None,
        rows: ClientRows | None = None,
    ):
        self.cfg = cfg
        self.client_ids = sorted(int(k) for k in client_ids)
        if device is None:
            use_gpu = cfg.resources.num_gpus_per_actor > 0 and torch.cuda.is_available()
            device = "cuda" if use_gpu else "cpu"
        self.device = torch.device(device)
        self.algorithm = ALGORITHMS[cfg.algorithm.name](cfg)
        self.task = task_for(cfg)
        self.model = build_adapted_model(cfg, self.task, self.algorithm).to(self.device)
        self.roles = self.algorithm.partition(self.model, self.task.head_names(self.model))
        bound = cfg.runtime.state_memory_mb
        self.data = ClientDataCache(self.task, self.client_ids, bound > 0, rows)
        self.personal = StateStore(int(bound * 2**20), cfg.runtime.state_dir, str(self.device))
        # Per adapted layer: (name, module, [(factor name, the model's tensor)]), for ranks.
        self._factors: list | None = None

    # ------------------------------------------------------------ state
    def initial_shared(self) -> Arrays:
        """theta_0: LoRA factors drawn from the run seed, head as built."""
        gen = seeds.torch_generator(self.cfg.seed, seeds.SHARED_INIT)
        return _to_numpy(self._fresh(self.roles.shared, gen))

    def personal_state(self, client_id: int) -> Tensors:
        """phi_k, created from (seed, client) on first use."""
        state = self.personal.get(client_id)
        if state is None:
            gen = seeds.torch_generator(self.cfg.seed, seeds.PERSONAL_INIT, client_id)
            fresh = self._fresh(self.roles.personal, gen)
            state = self.algorithm.init_personal(self.model, fresh, client_id)
            self.personal.put(client_id, state, fresh=True)
        return state

    def _fresh(self, names: list[str], gen: torch.Generator) -> Tensors:
        params = dict(self.model.named_parameters())
        lora = [n for n in names if n.rsplit(".", 1)[-1].startswith("lora_")]
        out = init_factors(self.model, lora, gen, self.cfg.adapter.init)
        out.update({n: params[n].detach().clone() for n in names if n not in out})
        return {k: v.to(self.device) for k, v in sorted(out.items())}

    def get_personal(self, client_ids: Sequence[int] | None = None) -> dict[int, Arrays]:
        """Personal state of the given (default: all) clients, as numpy, for checkpoints."""
        ids = self.client_ids if client_ids is None else client_ids
        return {k: _to_numpy(self.personal_state(k)) for k in ids}

    def set_personal(self, states: dict[int, Arrays]) -> None:
        """Restore clients' personal state (from a checkpoint)."""
        for k, arrays in states.items():
            self.personal.put(int(k), self._to_torch(arrays))

    def take_state(self, client_ids: Sequence[int]) -> dict[int, Arrays]:
        """Hand clients over to another host: their whole personal state, dropped here.

        A client that has no state yet is not in the result; the receiver then
        creates the same initial state from (seed, client).
        """
        out = {}
        for k in client_ids:
            state = self.personal.pop(int(k))
            if state is not None:
                out[int(k)] = _to_numpy(state)
        gone = {int(k) for k in client_ids}
        self.client_ids = [k for k in self.client_ids if k not in gone]
        self.data.drop(gone)
        return out

    def hand_over(self, client_ids: Sequence[int]) -> Handover:
        """:meth:`take_state` of ``client_ids`` with their rows, for :meth:`take_over`."""
        rows = self.data.rows_of(client_ids)
        return Handover(self.take_state(client_ids), rows)

    def take_over(self, handed: Handover) -> None:
        """Serve the clients of a :meth:`hand_over`: their rows, then their state."""
        self.data.add_rows(handed.rows)
        self.put_state(handed.states)

    def put_state(self, states: dict[int, Arrays]) -> None:
        """Take over clients handed over by :meth:`take_state`; this host is now their home."""
        self.set_personal(states)
        if states:  # (not on every call: sorting all the host's clients costs O(clients))
            self.client_ids = sorted(set(self.client_ids) | {int(k) for k in states})

    def _to_torch(self, arrays: Arrays) -> Tensors:
        return {k: torch.from_numpy(np.array(v)).to(self.device) for k, v in arrays.items()}

    # ------------------------------------------------------------ a round
    def train(self, theta: Arrays, round_: int, client_ids: Sequence[int]) -> TrainResult:
        """Local updates of ``client_ids`` from theta; returns their pre-summed contribution.

        Clients run and are summed in ascending id order, in float64, so the
        result does not depend on how clients are spread over hosts.
        """
        t0 = time.perf_counter()
        self.data.hold(client_ids)
        theta_t = self._to_torch(theta)
        summed = {k: np.zeros(v.shape, np.float64) for k, v in theta.items()}
        total, rows, seconds = 0.0, [], {}
        for k in sorted(client_ids):
            t_k = time.process_time()
            client = self.client_round(theta_t, round_, k)
            local = self.algorithm.local_update(client)
            self.personal.put(k, {n: v.detach() for n, v in local.phi.items()})
            weight, x = self.algorithm.contribution(client, local)
            total += weight
            for name, v in x.items():
                summed[name] += weight * v.detach().to("cpu", torch.float64).numpy()
            rows += [
                {"client_id": k, "split": "train", "metric": m, "value": float(v)}
                for m, v in sorted(local.metrics.items())
            ]
            seconds[k] = time.process_time() - t_k
        spilled, read = self.personal.take_counts()
        return TrainResult(
            summed, total, sorted(client_ids), rows, time.perf_counter() - t0, peak_rss_mb(),
            client_s=seconds, spilled_bytes=spilled, read_bytes=read,
        )

    @torch.no_grad()
    def evaluate(
        self, theta: Arrays, round_: int, client_ids: Sequence[int] | None = None
    ) -> EvalResult:
        """Each client's personalized model on its validation and test splits, plus its ranks.

        A client is personalized once (``eval_params``) and that model is scored on
        every split it has: ``val`` rows first when ``data.val_fraction`` > 0, then
        ``test``. Diagnostics (shared-only metric, norms) are computed per split too.
        """
        t0, c0 = time.perf_counter(), time.process_time()
        ids = self.client_ids if client_ids is None else sorted(client_ids)
        self.data.hold(ids)
        theta_t = self._to_torch(theta)
        out = EvalResult()
        for k in ids:
            client = self.client_round(theta_t, round_, k)
            params = self._eval_params(client)
            for split in client.data.eval_splits():
                scored = replace(client, data=client.data.for_split(split))
                metrics = self.task.evaluate(self.model, params, scored.data)
                metrics |= self.algorithm.diagnostics(scored, params, dict(metrics))
                out.rows += [
                    {"client_id": k, "split": split, "metric": m, "value": float(v)}
                    for m, v in sorted(metrics.items())
                ]
            out.ranks += self.ranks(params, k)
        out.compute_s, out.peak_rss_mb = time.perf_counter() - t0, peak_rss_mb()
        out.cpu_s = time.process_time() - c0
        out.spilled_bytes, out.read_bytes = self.personal.take_counts()
        return out

    def client_round(self, theta: Tensors, round_: int, client_id: int) -> ClientRound:
        """Client ``client_id``'s round ``round_`` from theta: what every algorithm hook gets."""
        ctx = RoundContext(self.cfg.seed, round_, client_id)
        phi, data = self.personal_state(client_id), self.data[client_id]
        return ClientRound(self.task, self.model, dict(theta), phi, data, ctx)

    def eval_params(self, theta: Tensors, round_: int, client_id: int) -> dict[str, torch.Tensor]:
        """The parameters client ``client_id`` is evaluated with after round ``round_``.

        ``algorithm.eval_params`` of (theta, phi_k) with the round's context; what
        :meth:`evaluate` scores and what ``pf2lora export`` writes.
        """
        return self._eval_params(self.client_round(theta, round_, client_id))

    def _eval_params(self, client: ClientRound) -> dict[str, torch.Tensor]:
        with torch.enable_grad():  # Per-FedAvg / HOMLoRA-FT take gradient steps here
            return self.algorithm.eval_params(client)

    def ranks(self, params: dict[str, torch.Tensor], client_id: int) -> list[dict]:
        """Energy and threshold rank of every adapted layer's dW for one client."""
        if self._factors is None:  # the model's layers never change: found once per host
            model_params = dict(self.model.named_parameters())
            names = SHARED_FACTORS + PERSONAL_FACTORS
            self._factors = [
                (layer, mod, [(f"{layer}.{f}", model_params[f"{layer}.{f}"]) for f in names])
                for layer, mod in lora_layers(self.model).items()
            ]
        rows = []
        for layer, mod, factors in self._factors:
            a, b, c, d = (params.get(name, default) for name, default in factors)
            u, v = update_factors(a, b, c, d, mod.scaling, mod.scaling_personal)
            s = factored_singular_values(u, v)
            rows.append(
                {
                    "client_id": client_id,
                    "layer": layer,
                    "energy_rank": energy_rank(s, self.cfg.rank.tau),
                    "threshold_rank": threshold_rank(s, self.cfg.rank.eps),
                    "singular_values": s.tolist(),
                    "true_rank": self.data[client_id].true_rank,
                }
            )
        return rows


def _to_numpy(tensors: Tensors) -> Arrays:
    return {k: v.detach().to("cpu").numpy().copy() for k, v in sorted(tensors.items())}
