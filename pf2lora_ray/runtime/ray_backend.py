"""Ray backend: client hosts as stateful Ray actors (DESIGN.md, Runtime).

Each :class:`~pf2lora_ray.runtime.actor.ClientActor` builds the frozen base
model once and keeps the personal state of the clients whose *home* it is.
Clients start in contiguous blocks, one per actor. Each round the driver

1. places the round's clients (:mod:`~pf2lora_ray.runtime.placement`): with
   ``placement="balanced"`` (default) longest-processing-time first on
   per-client cost estimates, preferring home actors; an evaluation round
   spreads every client evenly. ``placement="static"`` keeps the blocks;
2. moves the state of clients placed away from home: the giving actor's
   ``take_state`` result (their state and rows) goes, as an object ref, into the
   receiving actor's call, which takes it in before working; the receiver is the
   new home;
3. puts theta in the object store once, calls only actors with work, and sums
   their pre-summed partial results in a fixed order
   (:func:`~pf2lora_ray.runtime.base.combine`).

Every random draw depends on (seed, round, client) only and a client's state
moves whole, so results do not depend on placement, the number of actors or
which finishes first. Cost estimates
(:func:`~pf2lora_ray.runtime.actor.client_cost`): local steps x tokens per
batch, reported once by the actors that load each client's data at start;
they depend on the data only, so the placement is deterministic given (seed,
round, actor count). ``placement="measured"``
refines the estimate by each client's measured seconds (an exponential moving
average); the placement then varies from run to run, the results do not.

The driver's data check drew the partition once (``rows``): each actor is
created with its own clients' rows only, takes rows in with the clients handed
to it, and a recovered actor gets its clients' rows from the driver; no actor
reads or partitions the rows of clients it does not serve.

Sizing is in :mod:`~pf2lora_ray.runtime.sizing`, fault recovery in
:mod:`~pf2lora_ray.runtime.recovery`. ``faults.kill_actor_at_round=R``
(testing) makes the highest-numbered actor with work in round R exit its
process after its first client has trained, once per run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import ray

from pf2lora_ray.client import Arrays, EvalResult, TrainResult, peak_rss_mb, rss_mb
from pf2lora_ray.config import Config
from pf2lora_ray.runtime import placement as place
from pf2lora_ray.runtime.actor import ActorStateLost, ClientActor, actor_options
from pf2lora_ray.runtime.base import combine, combine_eval, stream_chunks
from pf2lora_ray.runtime.recovery import LOST, Recovery
from pf2lora_ray.runtime.sizing import actor_slots, requested_actors, start_ray
from pf2lora_ray.tasks.base import ClientRows

__all__ = ["ActorStateLost", "RayBackend", "requested_actors", "start_ray"]

Placement = Literal["balanced", "measured", "static"]
EMA = 0.5  # weight of the newest measurement in a client's measured cost


class RayBackend:
    """Client hosts as Ray actors; each round's clients placed to balance the actors.

    Args:
        cfg: the run's config; ``runtime`` says where Ray is, ``resources``
            what each actor gets and how many there are, ``faults`` how often
            lost work is retried.
        placement: ``balanced``, ``measured`` or ``static`` (module docstring); default
            ``runtime.placement``.
        rows: every client's rows of the data (the driver's data check), handed
            to each actor for its own clients only; None: each actor draws the
            partition itself (or generates its clients' data).

    Raises:
        ConfigError: the actors cannot be placed (raised before any starts).
    """

    def __init__(
        self, cfg: Config, placement: Placement | None = None, rows: ClientRows | None = None
    ) -> None:
        placement = placement or cfg.runtime.placement
        if placement not in ("balanced", "measured", "static"):
            raise ValueError(f"placement must be balanced, measured or static, not {placement!r}")
        self.cfg, self.placement, self.rows = cfg, placement, rows
        self.actors: list[Any] = []
        self.owns_ray = start_ray(cfg)
        try:
            self.slots = actor_slots(cfg)
            self.num_actors = len(self.slots)
            self.blocks = place.static_blocks(cfg.fed.num_clients, self.num_actors)
            self.home = {k: i for i, block in enumerate(self.blocks) for k in block}
            self.threads = cfg.runtime.threads_per_actor or max(
                1, int(cfg.resources.num_cpus_per_actor)
            )
            self.actors = [self._start(i) for i in range(self.num_actors)]
            ray.get([a.arm.remote() for a in self.actors])
            self.costs: dict[int, float] = {}  # client -> estimated cost (placement="balanced")
            for part in ray.get([a.cost_estimates.remote() for a in self.actors]):
                self.costs.update(part)
            self.recovery = Recovery(
                self.actors,
                self._start,
                self.clients_of,
                cfg.faults.max_retries,
                self.rows_of,
                cfg.faults.restart_timeout_s,
            )
            self.kill_round = cfg.faults.kill_actor_at_round
            self.measured: dict[int, float] = {}  # client -> seconds (placement="measured")
            self.stats: dict[str, Any] = {}
            # Waits for every actor's model; also the baseline of each actor's peak RSS.
            self.actor_rss = ray.get([a.peak_rss_mb.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise

    def _start(self, i: int) -> Any:
        options = actor_options(self.cfg, self.slots[i])
        block = self.blocks[i]
        return ClientActor.options(**options).remote(
            self.cfg, i, block, self.threads, self.rows_of(block)
        )

    def clients_of(self, i: int) -> list[int]:
        """The clients whose home actor ``i`` is now (ascending)."""
        return sorted(k for k, a in self.home.items() if a == i)

    def rows_of(self, client_ids: Sequence[int]) -> ClientRows | None:
        """The rows of ``client_ids`` (one message's worth), or None when there are none."""
        return None if self.rows is None else {k: self.rows[k] for k in client_ids}

    # ------------------------------------------------------------ a round
    def initial_shared(self) -> Arrays:
        return ray.get(self.actors[0].initial_shared.remote())

    def train(self, theta: Arrays, round_: int, client_ids: Sequence[int]) -> TrainResult:
        ref = ray.put(theta)
        self.stats = {}
        plan = self._plan(client_ids)
        incoming = self._hand_over(plan, f"round {round_} train")
        victim = max(plan.clients) if round_ == self.kill_round else None
        if victim is not None:
            self.kill_round = 0  # once per run, not again when the round is redone

        def call(i: int, first: bool) -> Any:
            given = incoming.get(i, []) if first else []
            crash = first and i == victim
            return self.actors[i].train.remote(ref, round_, plan.clients[i], *given, crash=crash)

        replies, dropped, faults = self.recovery.gather(
            sorted(plan.clients), call, f"round {round_} train"
        )
        parts = {i: part for i, (part, _) in replies.items()}
        trained = [k for p in parts.values() for k in p.clients]
        self.recovery.logged(round_, ref, trained, sum(v.nbytes for v in theta.values()))
        if self.recovery.full:  # bounded memory without checkpoints (recovery module docstring)
            self.snapshot()
        self._note(parts, plan.moved, replies, plan)
        if parts:
            result = combine(list(parts.values()))
        else:  # every sampled client was dropped: a zero update leaves theta as it is
            zeros = {k: np.zeros(v.shape, np.float64) for k, v in theta.items()}
            result = TrainResult(zeros, 0.0, [])
        if self.placement == "measured":
            for k, s in result.client_s.items():
                self.measured[k] = EMA * s + (1 - EMA) * self.measured.get(k, s)
        result.dropped = sorted(k for i in dropped for k in plan.clients[i])
        result.faults = self.recovery.take_faults() + faults
        return result

    def evaluate(
        self, theta: Arrays, round_: int, on_chunk: Callable[[EvalResult], None] | None = None
    ) -> EvalResult:
        """Every client, spread evenly over the actors (static: each on its block's actor).

        Each actor scores its clients ``runtime.eval_chunk`` at a time, all
        actors a chunk at once (:meth:`Backend.evaluate` for ``on_chunk``).
        """
        ref = ray.put(theta)
        everyone = range(self.cfg.fed.num_clients)
        plan = (
            place.stay(everyone, self.home)
            if self.placement == "static"
            else place.spread(everyone, self.home, self.num_actors)
        )
        incoming = self._hand_over(plan, f"round {round_} eval")
        size = self.cfg.runtime.eval_chunk
        longest = max((len(ks) for ks in plan.clients.values()), default=0)
        moved = {"clients": plan.moved}  # the hand-over is counted with the first chunk

        def score(start: int) -> EvalResult:
            chunk = {i: ks[start : start + size] for i, ks in plan.clients.items()}
            chunk = {i: ks for i, ks in chunk.items() if ks}

            def call(i: int, first: bool) -> Any:
                given = incoming.get(i, []) if first and start == 0 else []
                return self.actors[i].evaluate.remote(ref, round_, chunk[i], *given)

            what = f"round {round_} eval"
            replies, dropped, faults = self.recovery.gather(sorted(chunk), call, what)
            parts = {i: part for i, (part, _) in replies.items()}
            self._note(parts, moved.pop("clients", 0), replies)
            result = combine_eval(list(parts.values()))
            result.dropped = sorted(k for i in dropped for k in chunk[i])
            result.faults = self.recovery.take_faults() + faults
            return result

        chunks = [lambda s=s: score(s) for s in range(0, longest, size)]
        return stream_chunks(chunks, on_chunk)

    def round_stats(self) -> dict[str, Any]:
        """The last round's placement.

        Returns:
            ``placement`` (per actor, the clients it trained), ``actor_clients``
            and ``actor_compute_s`` (per actor, how many and their seconds),
            ``moved_clients`` and ``moved_bytes`` (personal state moved between
            actors, training and evaluation together).
        """
        return dict(self.stats)

    # ------------------------------------------------------------ personal state
    def get_personal(self) -> dict[int, Arrays]:
        """Every client's personal state (read only: the restore point stays as it is)."""
        return self._fetch()

    def snapshot(self) -> dict[int, Arrays]:
        """Every client's personal state, which also becomes the restore point (checkpoints)."""
        states = self._fetch()
        self.recovery.new_snapshot(states)
        return states

    def set_personal(self, states: dict[int, Arrays]) -> None:
        """Send each client's state to its home actor; all clients' become the restore point."""
        parts: dict[int, dict[int, Arrays]] = {}
        for k, arrays in states.items():
            if int(k) not in self.home:
                raise KeyError(f"client {k} is not in 0..{self.cfg.fed.num_clients - 1}")
            parts.setdefault(self.home[int(k)], {})[int(k)] = arrays
        refs = {i: ray.put(p) for i, p in sorted(parts.items())}
        complete = {i: set(self.clients_of(i)) <= set(p) for i, p in parts.items()}

        def send(i: int, first: bool) -> Any:
            return self.actors[i].set_personal.remote(refs[i], complete[i])

        self.recovery.gather_all(sorted(refs), send, "set_personal")
        if len(states) == self.cfg.fed.num_clients:
            self.recovery.new_snapshot({int(k): v for k, v in states.items()})
        else:
            self.snapshot()

    def _fetch(self) -> dict[int, Arrays]:
        ids = {i: self.clients_of(i) for i in range(self.num_actors)}
        parts = self.recovery.gather_all(
            [i for i in ids if ids[i]],
            lambda i, first: self.actors[i].get_personal.remote(ids[i]),
            "get_personal",
        )
        states: dict[int, Arrays] = {}
        for i in sorted(parts):
            states.update(parts[i])
        return dict(sorted(states.items()))

    # ------------------------------------------------------------ placement
    def placement_state(self) -> Arrays:
        """Where the clients are, for a checkpoint (:meth:`restore_placement` reads it back).

        Returns:
            ``home`` (int64, one entry per client: the actor holding its state),
            ``actors`` (int64 (1,): how many actors there are), and the measured
            seconds of ``placement="measured"`` as ``measured_clients`` (int64)
            and ``measured_s`` (float64), empty otherwise.
        """
        ids = sorted(self.measured)
        return {
            "home": np.array([self.home[k] for k in range(self.cfg.fed.num_clients)], np.int64),
            "actors": np.array([self.num_actors], np.int64),
            "measured_clients": np.array(ids, np.int64),
            "measured_s": np.array([self.measured[k] for k in ids], np.float64),
        }

    def restore_placement(self, saved: Arrays) -> bool:
        """Make a checkpoint's placement current; call before :meth:`set_personal` on resume.

        Each actor is told exactly which clients it is home to. No state moves:
        right after start no actor has used any, and :meth:`set_personal` then
        sends each client's state to its restored home.

        Args:
            saved: :meth:`placement_state` as a checkpoint holds it (checked there:
                one home per client, each below the actor count); empty for none.

        Returns:
            False, keeping the static blocks, when ``saved`` is empty or was
            written for another number of actors (a resume on another cluster:
            results do not depend on placement, only which state moves does).
        """
        if not saved or int(saved["actors"][0]) != self.num_actors:
            return False
        self.home = {k: int(i) for k, i in enumerate(saved["home"].tolist())}
        ids, seconds = saved["measured_clients"].tolist(), saved["measured_s"].tolist()
        self.measured = dict(zip(ids, seconds, strict=True))
        self.recovery.gather_all(
            range(self.num_actors),
            lambda i, first: self.actors[i].restore.remote(
                self.clients_of(i), self.rows_of(self.clients_of(i))
            ),
            "restore placement",
        )
        return True

    def _plan(self, client_ids: Sequence[int]) -> place.Plan:
        ids = sorted(int(k) for k in client_ids)
        unknown = [k for k in ids if k not in self.home]
        if unknown:
            raise KeyError(f"client {unknown[0]} is not in 0..{self.cfg.fed.num_clients - 1}")
        if self.placement == "static":
            return place.stay(ids, self.home)
        typical = float(np.median(list(self.costs.values()))) if self.costs else 1.0
        costs = {k: self.costs.get(k, typical) for k in ids}
        if self.placement == "measured" and self.measured:
            # Seconds per estimated unit, for clients not measured yet.
            rates = [s / self.costs.get(k, typical) for k, s in self.measured.items()]
            rate = float(np.median(rates))
            costs = {k: self.measured.get(k, rate * costs[k]) for k in ids}
        return place.balance(costs, self.home, self.num_actors)

    def _hand_over(self, plan: place.Plan, what: str) -> dict[int, list[Any]]:
        """Start the state moves of ``plan``; returns, per receiving actor, the refs to take in.

        A giver whose last work was dropped is recovered first, so that it can hand over.
        """
        givers = sorted({src for src, _ in plan.moves} & self.recovery.broken)
        if givers:
            self.recovery.gather_all(givers, lambda i, first: self.actors[i].node_id.remote(), what)
        incoming: dict[int, list[Any]] = {}
        for (src, dst), ks in plan.moves.items():
            incoming.setdefault(dst, []).append(self.actors[src].take_state.remote(ks))
            self.home.update(dict.fromkeys(ks, dst))
        return incoming

    def _note(
        self, parts: dict[int, Any], moved: int, replies: dict, plan: place.Plan | None = None
    ) -> None:
        """Add a call's peak RSS and state moved to the round's stats; ``plan``: a training one."""
        for i, part in parts.items():
            self.actor_rss[i] = max(self.actor_rss[i], part.peak_rss_mb)
        moved += self.stats.get("moved_clients", 0)
        moved_bytes = self.stats.get("moved_bytes", 0) + sum(b for _, b in replies.values())
        self.stats |= {"moved_clients": moved, "moved_bytes": moved_bytes}
        if plan is not None:
            per_actor = range(self.num_actors)
            self.stats["placement"] = [plan.clients.get(i, []) for i in per_actor]
            self.stats["actor_clients"] = [len(plan.clients.get(i, [])) for i in per_actor]
            self.stats["actor_compute_s"] = [
                parts[i].compute_s if i in parts else 0.0 for i in per_actor
            ]

    # ------------------------------------------------------------ resources
    def peak_rss_mb(self) -> float:
        """Driver's peak RSS plus every actor's latest reported peak."""
        return peak_rss_mb() + float(sum(self.actor_rss))

    def rss_mb(self) -> float:
        """Driver's current RSS plus every live actor's (a dead one counts nothing)."""
        total = rss_mb()
        for ref in [a.rss_mb.remote() for a in self.actors]:
            with contextlib.suppress(*LOST):  # a lost actor is recovered at its next real use
                total += ray.get(ref, timeout=self.cfg.faults.restart_timeout_s)
        return total

    def node_ids(self) -> list[str]:
        """The Ray node each actor runs on, in actor order."""
        return ray.get([a.node_id.remote() for a in self.actors])

    def close(self) -> None:
        """Kill the actors; shut Ray down only if this backend started it."""
        for ref in [a.release.remote() for a in self.actors]:
            with contextlib.suppress(*LOST):  # a dead actor's folder went with its process
                ray.get(ref, timeout=self.cfg.faults.restart_timeout_s)
        for actor in self.actors:
            ray.kill(actor)
        self.actors.clear()
        if self.owns_ray:
            ray.shutdown()
            self.owns_ray = False
