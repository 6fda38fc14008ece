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

Faults (an actor's process dies, ``ray.kill``, its node is lost). Actors start
with ``max_restarts=faults.max_retries``, so Ray restarts a dead one wherever
there is room; the restarted actor has lost its clients' personal state and
refuses work until it is restored (:class:`ActorStateLost`). To restore it
exactly the backend keeps, per actor:

- a *restore point*: the actor's personal state as last handed to a checkpoint
  (:meth:`RayBackend.get_personal`, which the checkpoint writer calls) or read
  from one (:meth:`RayBackend.set_personal`, which ``--resume`` calls), put in
  the object store by the driver so it lives on the driver's node, not on the
  actor's (perhaps lost) one. Before the first checkpoint it is "fresh": every
  client's initial state, drawn from (seed, client).
- a *replay log*: for each round trained since that point, the round's theta
  (the object ref already put for it) and the actor's clients trained in it.

A call that fails with a RayActorError (died, unavailable) or ActorStateLost is
retried up to ``faults.max_retries`` times. Each retry waits for Ray's restart
(or, when Ray has given up on the actor, starts a replacement), restores the
restore point, replays the log with ``train`` and redoes the call. Every random
draw depends only on (seed, round, client), so replayed state and redone work
equal a fault-free run's. When the retries are used up the actor's clients are
dropped from that round's training (or evaluation), the actor is recovered at
its next use, and system.parquet lists them in ``dropped_clients``; every
failure met is described in ``faults``. The log spans the rounds since the last
checkpoint, so ``checkpoint.every`` bounds both its memory (one theta per round)
and the work redone after a loss.

``faults.kill_actor_at_round=R`` (testing) makes one actor exit its process in
the middle of round R's training, after its first sampled client has trained,
once per run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray
import torch
from ray.util.placement_group import PlacementGroup, get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pf2lora_ray.client import Arrays, ClientHost, EvalResult, TrainResult, peak_rss_mb, rss_mb
from pf2lora_ray.config import Config, ConfigError
from pf2lora_ray.runtime.base import combine, combine_eval

_EPS = 1e-9  # fractional resources: 1.0 / 0.1 must count as 10 actors, not 9
RESTART_TIMEOUT_S = 120.0  # how long a recovery waits for Ray to restart an actor
CRASH_EXIT_CODE = 1  # what an actor exits with when faults.kill_actor_at_round fires

log = logging.getLogger(__name__)


class ActorStateLost(RuntimeError):
    """A restarted client actor was asked to use personal state it no longer holds."""


# Failures after which an actor's clients are restored and their work redone.
LOST = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ActorStateLost)


@ray.remote
class ClientActor:
    """A :class:`ClientHost` in its own Ray worker; every method delegates.

    Args:
        cfg: the run's config.
        client_ids: the clients this actor hosts for the whole run.
        threads: torch intra-op threads; set here because Ray's OMP_NUM_THREADS
            is not honoured by a reused worker that already imported torch.
        replacement: this actor replaces one that died for good, so it holds
            none of its clients' state until restored.
    """

    def __init__(
        self, cfg: Config, client_ids: Sequence[int], threads: int, replacement: bool = False
    ) -> None:
        torch.set_num_threads(threads)
        self.host = ClientHost(cfg, client_ids)
        # Ray restarts a dead actor (max_restarts) with fresh personal state. Until
        # the driver restores its clients (set_personal), using it would silently
        # train or checkpoint the wrong state, so those calls refuse.
        self.state_lost = replacement or ray.get_runtime_context().was_current_actor_reconstructed

    def initial_shared(self) -> Arrays:
        return self.host.initial_shared()

    def train(
        self, theta: Arrays, round_: int, client_ids: Sequence[int], crash: bool = False
    ) -> TrainResult:
        """Train ``client_ids``; ``crash`` (fault injection) exits the process after the first."""
        host = self._intact()
        if crash:
            # A real mid-round loss: one client's state has changed, then the process is gone.
            host.train(theta, round_, client_ids[:1])
            os._exit(CRASH_EXIT_CODE)
        return host.train(theta, round_, client_ids)

    def evaluate(self, theta: Arrays, round_: int) -> EvalResult:
        return self._intact().evaluate(theta, round_)

    def get_personal(self) -> dict[int, Arrays]:
        return self._intact().get_personal()

    def set_personal(self, states: dict[int, Arrays]) -> None:
        self.host.set_personal(states)
        self.state_lost = self.state_lost and not set(self.host.client_ids) <= set(states)

    def restore(self, states: dict[int, Arrays] | None) -> None:
        """Replace all clients' personal state with ``states`` (None: each client's initial)."""
        self.host.personal = {}
        self.host.set_personal(states or {})
        self.state_lost = False

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def rss_mb(self) -> float:
        return rss_mb()

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
            what each actor gets and how many there are, ``faults`` how often
            lost work is retried.

    Raises:
        ConfigError: the actors cannot be placed (raised before any starts).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.actors: list[Any] = []
        self.owns_ray = start_ray(cfg)
        try:
            pg = get_current_placement_group()
            self.slots = _bundle_slots(cfg, pg) if pg is not None else _cluster_slots(cfg)
            self.num_actors = len(self.slots)
            blocks = np.array_split(np.arange(cfg.fed.num_clients), self.num_actors)
            self.blocks = [[int(k) for k in b] for b in blocks]
            self.owner = {k: i for i, block in enumerate(self.blocks) for k in block}
            threads = cfg.runtime.threads_per_actor or max(1, int(cfg.resources.num_cpus_per_actor))
            # Kept so that an actor Ray has given up on can be replaced.
            self.actor_args = [(cfg, block, threads) for block in self.blocks]
            self.actors = [self._start(i) for i in range(self.num_actors)]
            # Recovery state (module docstring): restore point and replay log per actor.
            self.restore_points: list[Any] = [None] * self.num_actors
            self.replay: list[list[tuple[int, Any, list[int]]]] = [[] for _ in self.blocks]
            self.broken: set[int] = set()  # actors whose last work was dropped
            self.pending_faults: list[str] = []  # met outside a round's train/eval
            self.kill_round = cfg.faults.kill_actor_at_round
            # Waits for every actor's model; also the baseline of each actor's peak RSS.
            self.actor_rss = ray.get([a.peak_rss_mb.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise

    def _start(self, i: int, replacement: bool = False) -> Any:
        options = {
            "num_cpus": self.cfg.resources.num_cpus_per_actor,
            "num_gpus": self.cfg.resources.num_gpus_per_actor,
            "max_restarts": self.cfg.faults.max_retries,
            "scheduling_strategy": self.slots[i],
        }
        return ClientActor.options(**options).remote(*self.actor_args[i], replacement)

    def initial_shared(self) -> Arrays:
        return ray.get(self.actors[0].initial_shared.remote())

    def train(self, theta: Arrays, round_: int, client_ids: Sequence[int]) -> TrainResult:
        ref = ray.put(theta)
        routes = dict(self._route(client_ids))
        victim = max(routes) if round_ == self.kill_round else None
        if victim is not None:
            self.kill_round = 0  # once per run, not again when the round is redone

        def call(i: int, first: bool) -> Any:
            crash = first and i == victim
            return self.actors[i].train.remote(ref, round_, routes[i], crash=crash)

        parts, dropped, faults = self._gather(sorted(routes), call, f"round {round_} train")
        for i in parts:
            self.replay[i].append((round_, ref, routes[i]))
        self._note_rss(parts)
        if parts:
            result = combine(list(parts.values()))
        else:  # every sampled client was dropped: a zero update leaves theta as it is
            zeros = {k: np.zeros(v.shape, np.float64) for k, v in theta.items()}
            result = TrainResult(zeros, 0.0, [])
        result.dropped = sorted(k for i in dropped for k in routes[i])
        result.faults, self.pending_faults = self.pending_faults + faults, []
        return result

    def evaluate(self, theta: Arrays, round_: int) -> EvalResult:
        ref = ray.put(theta)
        parts, dropped, faults = self._gather(
            range(self.num_actors),
            lambda i, first: self.actors[i].evaluate.remote(ref, round_),
            f"round {round_} eval",
        )
        self._note_rss(parts)
        result = combine_eval(list(parts.values()))
        result.dropped = sorted(k for i in dropped for k in self.blocks[i])
        result.faults = faults
        return result

    def get_personal(self) -> dict[int, Arrays]:
        """Every client's personal state; also each actor's new restore point."""
        parts = self._snapshot(range(self.num_actors))
        states: dict[int, Arrays] = {}
        for i in sorted(parts):
            states.update(parts[i])
        return dict(sorted(states.items()))

    def set_personal(self, states: dict[int, Arrays]) -> None:
        """Route each client's state to its actor; a whole block becomes its restore point."""
        parts: dict[int, dict[int, Arrays]] = {}
        for k, arrays in states.items():
            parts.setdefault(self._owner_of(int(k)), {})[int(k)] = arrays
        refs = {i: ray.put(p) for i, p in sorted(parts.items())}

        def send(i: int, first: bool) -> Any:
            return self.actors[i].set_personal.remote(refs[i])

        self._gather_all(sorted(refs), send, "set_personal")
        partial = []
        for i, part in parts.items():
            if set(self.blocks[i]) <= set(part):
                self.restore_points[i], self.replay[i] = refs[i], []
            else:
                partial.append(i)
        self._snapshot(partial)

    def peak_rss_mb(self) -> float:
        """Driver's peak RSS plus every actor's latest reported peak."""
        return peak_rss_mb() + float(sum(self.actor_rss))

    def rss_mb(self) -> float:
        """Driver's current RSS plus every live actor's (a dead one counts nothing)."""
        total = rss_mb()
        for ref in [a.rss_mb.remote() for a in self.actors]:
            with contextlib.suppress(*LOST):  # a lost actor is recovered at its next real use
                total += ray.get(ref, timeout=RESTART_TIMEOUT_S)
        return total

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

    # ------------------------------------------------------------ faults
    def _gather(
        self, ids: Sequence[int], call: Callable[[int, bool], Any], what: str
    ) -> tuple[dict[int, Any], list[int], list[str]]:
        """``call(i, first)`` on each actor in ``ids``, recovering and redoing lost work.

        Returns:
            (results by actor, actors dropped after ``faults.max_retries``
            retries, a description of every failure met).
        """
        retries = self.cfg.faults.max_retries
        refs = {i: None if i in self.broken else call(i, True) for i in ids}
        results: dict[int, Any] = {}
        dropped: list[int] = []
        faults: list[str] = []
        for i in ids:
            ref = refs[i]
            for _ in range(retries + 1):
                try:
                    if ref is None:
                        replayed = self._recover(i)
                        faults.append(
                            f"{what}: {self._name(i)} restored, replayed rounds {replayed}, "
                            "work redone"
                        )
                        ref = call(i, False)
                    results[i] = ray.get(ref)
                    self.broken.discard(i)
                    break
                except LOST as err:
                    ref = None
                    faults.append(f"{what}: {self._name(i)} lost ({type(err).__name__})")
            else:
                self.broken.add(i)
                dropped.append(i)
                faults.append(f"{what}: {self._name(i)} dropped after {retries} retries")
        for message in faults:
            log.warning("faults: %s", message)
        return results, dropped, faults

    def _gather_all(
        self, ids: Sequence[int], call: Callable[[int, bool], Any], what: str
    ) -> dict[int, Any]:
        """:meth:`_gather` for personal-state transfers, which cannot drop an actor: they raise."""
        results, dropped, faults = self._gather(ids, call, what)
        self.pending_faults += faults
        if dropped:
            names = ", ".join(self._name(i) for i in dropped)
            raise RuntimeError(
                f"{names} could not be recovered within faults.max_retries="
                f"{self.cfg.faults.max_retries} retries; their clients' personal state is in "
                "the latest checkpoint (pf2lora run ... --resume)"
            )
        return results

    def _snapshot(self, ids: Sequence[int]) -> dict[int, dict[int, Arrays]]:
        """Fetch the actors' personal state and make it their restore point."""
        parts = self._gather_all(
            list(ids), lambda i, first: self.actors[i].get_personal.remote(), "get_personal"
        )
        for i, part in parts.items():
            # Re-put by the driver: an actor's own return value lives on its node.
            self.restore_points[i], self.replay[i] = ray.put(part), []
        return parts

    def _recover(self, i: int) -> list[int]:
        """Bring actor ``i`` back to its clients' exact current state; returns rounds replayed."""
        if not self._alive(i):
            # Ray has given up on it (restarts used up): a replacement takes its place.
            ray.kill(self.actors[i], no_restart=True)
            self.actors[i] = self._start(i, replacement=True)
            ray.get(self.actors[i].node_id.remote(), timeout=RESTART_TIMEOUT_S)
        actor = self.actors[i]
        refs = [actor.restore.remote(self.restore_points[i])]
        refs += [actor.train.remote(theta, r, ks) for r, theta, ks in self.replay[i]]
        ray.get(refs)
        return [r for r, _, _ in self.replay[i]]

    def _alive(self, i: int) -> bool:
        """Wait while Ray restarts actor ``i``; False if it is dead for good."""
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while True:
            try:
                ray.get(self.actors[i].node_id.remote(), timeout=RESTART_TIMEOUT_S)
                return True
            except ray.exceptions.ActorDiedError:
                return False
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _name(self, i: int) -> str:
        block = self.blocks[i]
        return f"actor {i} (clients {block[0]}..{block[-1]})"

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

    def _note_rss(self, parts: dict[int, Any]) -> None:
        for i, part in parts.items():
            self.actor_rss[i] = max(self.actor_rss[i], part.peak_rss_mb)
