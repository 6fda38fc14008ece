"""Ray backend: client hosts as stateful Ray actors (DESIGN.md, Runtime).

Each :class:`ClientActor` wraps one :class:`~pf2lora_ray.client.ClientHost`: it
builds the frozen base model once and keeps its clients' personal state between
rounds. Clients are split into contiguous blocks, one block per actor, for the
whole run. Per round the driver puts theta in the object store once, calls only
the actors that hold sampled clients, and sums their pre-summed partial results
in a fixed order (:func:`~pf2lora_ray.runtime.base.combine`), so results do not
depend on the number of actors or on which finishes first.

How many actors: ``resources.num_actors``, else ``ceil(num_clients /
resources.clients_per_actor)``, else as many as the free resources allow (inside
a Tune trial: one per actor bundle of the trial's placement group). A config
that cannot be placed is a :class:`ConfigError` raised before any actor starts,
because an actor that never fits waits forever without a word.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pf2lora_ray.client import Arrays, ClientHost, EvalResult, TrainResult, peak_rss_mb
from pf2lora_ray.config import Config, ConfigError
from pf2lora_ray.runtime.base import combine, combine_eval

_EPS = 1e-9  # fractional resources: 1.0 / 0.1 must count as 10 actors, not 9


class ActorStateLost(RuntimeError):
    """A restarted client actor was asked to use personal state it no longer holds."""


@ray.remote
class ClientActor:
    """A :class:`ClientHost` in its own Ray worker; every method delegates.

    Args:
        cfg: the run's config.
        client_ids: the clients this actor hosts for the whole run.
        threads: torch intra-op threads; set here because Ray's OMP_NUM_THREADS
            is not honoured by a reused worker that already imported torch.
    """

    def __init__(self, cfg: Config, client_ids: Sequence[int], threads: int) -> None:
        torch.set_num_threads(threads)
        self.host = ClientHost(cfg, client_ids)
        # Ray restarts a dead actor (max_restarts) with fresh personal state. Until
        # the driver restores its clients (set_personal), using it would silently
        # train or checkpoint the wrong state, so those calls refuse.
        self.state_lost = ray.get_runtime_context().was_current_actor_reconstructed

    def initial_shared(self) -> Arrays:
        return self.host.initial_shared()

    def train(self, theta: Arrays, round_: int, client_ids: Sequence[int]) -> TrainResult:
        return self._intact().train(theta, round_, client_ids)

    def evaluate(self, theta: Arrays, round_: int) -> EvalResult:
        return self._intact().evaluate(theta, round_)

    def get_personal(self) -> dict[int, Arrays]:
        return self._intact().get_personal()

    def set_personal(self, states: dict[int, Arrays]) -> None:
        self.host.set_personal(states)
        self.state_lost = self.state_lost and not set(self.host.client_ids) <= set(states)

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def _intact(self) -> ClientHost:
        if self.state_lost:
            raise ActorStateLost(
                f"the actor hosting clients {self.host.client_ids[0]}..{self.host.client_ids[-1]} "
                "was restarted and lost their personal state; restore them with set_personal "
                "(e.g. from the latest checkpoint) before training"
            )
        return self.host


def start_ray(cfg: Config) -> bool:
    """Connect to ``runtime.address`` / RAY_ADDRESS, else start an embedded local Ray.

    An already initialised Ray (a Tune trial, a test fixture) is reused.
    Returns whether this call started Ray (and so should shut it down).
    """
    if ray.is_initialized():
        return False
    quiet = cfg.runtime.quiet
    common: dict[str, Any] = {
        "log_to_driver": not quiet,
        "logging_level": logging.WARNING if quiet else logging.INFO,
    }
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **common)
    else:
        # Token authentication and the 127.0.0.1 dashboard host stay Ray's defaults.
        ray.init(include_dashboard=cfg.runtime.dashboard, **common)
    return True


def requested_actors(cfg: Config) -> int:
    """Actors the config asks for (0 = as many as fit), never more than clients."""
    res, n = cfg.resources, cfg.fed.num_clients
    if res.num_actors > 0:
        return min(res.num_actors, n)
    if res.clients_per_actor > 0:
        return math.ceil(n / res.clients_per_actor)
    return 0


def _need(cfg: Config) -> dict[str, float]:
    res = cfg.resources
    return {"CPU": res.num_cpus_per_actor, "GPU": res.num_gpus_per_actor}


def _fit(have: dict[str, float], need: dict[str, float]) -> float:
    """How many actors needing ``need`` fit in ``have`` (inf when nothing is needed)."""
    counts = [math.floor(have.get(r, 0.0) / q + _EPS) for r, q in need.items() if q > 0]
    return min(counts, default=math.inf)


def _key(resource: str) -> str:
    return f"resources.num_{resource.lower()}s_per_actor"


def _free_resources(demand: dict[str, float], grace_s: float = 2.0) -> dict[str, float]:
    """The cluster's free resources, waiting up to ``grace_s`` for ``demand`` to be free.

    Ray reports resources of just-killed actors (a backend closed a moment ago)
    as free only after about 0.1 s, so a short wait avoids a false shortfall.
    """
    deadline = time.monotonic() + grace_s
    while True:
        free = ray.available_resources()
        enough = all(free.get(r, 0.0) + _EPS >= q for r, q in demand.items())
        if enough or time.monotonic() > deadline:
            return free
        time.sleep(0.05)


def _cluster_slots(cfg: Config) -> list[Any]:
    """One scheduling strategy per actor that fits the cluster's free resources.

    Raises:
        ConfigError: no node is big enough for one actor, or the requested
            number of actors is more than the free resources hold.
    """
    need = _need(cfg)
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    for r, q in need.items():
        largest = max((node.get(r, 0.0) for node in nodes), default=0.0)
        if q > largest + _EPS:
            raise ConfigError(
                f"{_key(r)}={q:g} but the largest node has {largest:g} {r} "
                f"(short by {q - largest:g} {r} per actor); lower {_key(r)} or add a node "
                f"with at least {q:g} {r}"
            )
    wanted = requested_actors(cfg)
    free = _free_resources({r: wanted * q for r, q in need.items()})
    for r, q in need.items():
        short = wanted * q - free.get(r, 0.0)
        if q > 0 and short > _EPS:
            raise ConfigError(
                f"{wanted} actors x {_key(r)}={q:g} need {wanted * q:g} {r} but the cluster "
                f"has {free.get(r, 0.0):g} free (short by {short:g} {r}); ask for fewer actors "
                "(resources.num_actors / resources.clients_per_actor) or less per actor"
            )
    fit = min(_fit(free, need), sum(_fit(node, need) for node in nodes))
    if fit == math.inf:  # actors that ask for nothing: one per free CPU
        fit = max(1, int(free.get("CPU", 1.0)))
    count = wanted or min(fit, cfg.fed.num_clients)
    if count < 1 or wanted > fit:
        have = {r: free.get(r, 0.0) for r in need}
        raise ConfigError(
            f"{max(wanted, 1)} actor(s) needing {need} each do not fit in the cluster's free "
            f"resources {have} (at most {fit} fit); free some resources or ask for less per actor"
        )
    # SPREAD balances actors (and their memory) over the nodes of a cluster.
    return ["SPREAD"] * int(count)


def _bundle_slots(cfg: Config, pg: PlacementGroup) -> list[Any]:
    """Inside a Tune trial: one strategy per actor bundle (bundles 1..; 0 is the trial)."""
    need = _need(cfg)
    bundles = [i for i, b in enumerate(pg.bundle_specs) if i > 0 and _fit(b, need) >= 1]
    wanted = requested_actors(cfg) or min(len(bundles), cfg.fed.num_clients)
    if wanted == 0 or wanted > len(bundles):
        raise ConfigError(
            f"the trial's placement group has {len(bundles)} bundle(s) after bundle 0 that fit "
            f"an actor needing {need}, but {max(wanted, 1)} actor(s) are needed; reserve one "
            "bundle per actor in the trial's PlacementGroupFactory"
        )
    return [
        PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
        for i in bundles[:wanted]
    ]


class RayBackend:
    """Client hosts as Ray actors, clients in contiguous blocks, one block per actor.

    Args:
        cfg: the run's config; ``runtime`` says where Ray is, ``resources``
            what each actor gets and how many there are.

    Raises:
        ConfigError: the actors cannot be placed (raised before any starts).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.actors: list[Any] = []
        self.owns_ray = start_ray(cfg)
        try:
            pg = get_current_placement_group()
            slots = _bundle_slots(cfg, pg) if pg is not None else _cluster_slots(cfg)
            self.num_actors = len(slots)
            blocks = np.array_split(np.arange(cfg.fed.num_clients), self.num_actors)
            self.blocks = [[int(k) for k in b] for b in blocks]
            self.owner = {k: i for i, block in enumerate(self.blocks) for k in block}
            threads = cfg.runtime.threads_per_actor or max(1, int(cfg.resources.num_cpus_per_actor))
            # Kept so that a restarted actor (max_restarts) can be rebuilt and refilled.
            self.actor_args = [(cfg, block, threads) for block in self.blocks]
            options = {
                "num_cpus": cfg.resources.num_cpus_per_actor,
                "num_gpus": cfg.resources.num_gpus_per_actor,
                "max_restarts": cfg.faults.max_retries,
            }
            self.actors = [
                ClientActor.options(**options, scheduling_strategy=slot).remote(*args)
                for slot, args in zip(slots, self.actor_args, strict=True)
            ]
            # Waits for every actor's model; also the baseline of each actor's peak RSS.
            self.actor_rss = ray.get([a.peak_rss_mb.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise

    def initial_shared(self) -> Arrays:
        return ray.get(self.actors[0].initial_shared.remote())

    def train(self, theta: Arrays, round_: int, client_ids: Sequence[int]) -> TrainResult:
        ref = ray.put(theta)
        routes = self._route(client_ids)
        parts = ray.get([self.actors[i].train.remote(ref, round_, ks) for i, ks in routes])
        self._note_rss([i for i, _ in routes], parts)
        return combine(parts)

    def evaluate(self, theta: Arrays, round_: int) -> EvalResult:
        ref = ray.put(theta)
        parts = ray.get([a.evaluate.remote(ref, round_) for a in self.actors])
        self._note_rss(range(self.num_actors), parts)
        return combine_eval(parts)

    def get_personal(self) -> dict[int, Arrays]:
        states: dict[int, Arrays] = {}
        for part in ray.get([a.get_personal.remote() for a in self.actors]):
            states.update(part)
        return dict(sorted(states.items()))

    def set_personal(self, states: dict[int, Arrays]) -> None:
        parts: dict[int, dict[int, Arrays]] = {}
        for k, arrays in states.items():
            parts.setdefault(self._owner_of(int(k)), {})[int(k)] = arrays
        ray.get([self.actors[i].set_personal.remote(p) for i, p in sorted(parts.items())])

    def peak_rss_mb(self) -> float:
        """Driver's peak RSS plus every actor's latest reported peak."""
        return peak_rss_mb() + float(sum(self.actor_rss))

    def node_ids(self) -> list[str]:
        """The Ray node each actor runs on, in actor order."""
        return ray.get([a.node_id.remote() for a in self.actors])

    def close(self) -> None:
        """Kill the actors; shut Ray down only if this backend started it."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False

    # ------------------------------------------------------------ routing
    def _owner_of(self, client_id: int) -> int:
        if client_id not in self.owner:
            raise KeyError(f"client {client_id} is not in 0..{self.cfg.fed.num_clients - 1}")
        return self.owner[client_id]

    def _route(self, client_ids: Sequence[int]) -> list[tuple[int, list[int]]]:
        """Sampled clients grouped by the actor that holds them, in actor order."""
        groups: dict[int, list[int]] = {}
        for k in sorted(int(k) for k in client_ids):
            groups.setdefault(self._owner_of(k), []).append(k)
        return sorted(groups.items())

    def _note_rss(self, actor_ids: Sequence[int], parts: Sequence[Any]) -> None:
        for i, part in zip(actor_ids, parts, strict=True):
            self.actor_rss[i] = max(self.actor_rss[i], part.peak_rss_mb)
