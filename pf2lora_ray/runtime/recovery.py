"""Lost actors are restored exactly: snapshot + replay, per client (DESIGN.md, Runtime; faults).

Actors start with ``max_restarts=faults.max_retries``, so Ray restarts a dead
one (its process died, ``ray.kill``, its node was lost) wherever there is room;
the restarted actor holds none of its clients' state and refuses work until it
is restored (:class:`~pf2lora_ray.runtime.actor.ActorStateLost`). To restore it
the driver keeps, for all clients together:

- a *snapshot*: every client's personal state as last handed to a checkpoint
  (:meth:`RayBackend.snapshot`) or read from one (:meth:`RayBackend.set_personal`,
  which ``--resume`` calls), put in the object store by the driver so it lives
  on the driver's node, not on an actor's (perhaps lost) one. Before the first
  checkpoint it is "fresh": every client's initial state, drawn from (seed, client).
- a *log*: for each round trained since that snapshot, the round's theta (the
  object ref already put for it) and the clients whose training counted.

Clients move between actors, so recovery works per client: actor ``i`` gets the
snapshot state of the clients whose home it is now, with their rows of the data
from the driver (the partition its data check drew), and replays, round by round,
the logged training of exactly those clients. A client's update depends only on
theta, its own state and (seed, round, client), so the replayed state equals a
fault-free run's wherever the client trained before.

A call that fails with a RayActorError (died, unavailable), a lost object (a
hand-over from an actor whose node is gone) or ActorStateLost is retried up to
``faults.max_retries`` times: wait for Ray's restart (or start a replacement when
Ray has given up), restore, replay, redo the call. When the retries are used up
the actor's clients are dropped from that round's training (or evaluation), the
actor is recovered at its next use, and system.parquet lists them in
``dropped_clients``; every failure met is described in ``faults``. The log spans
the rounds since the last snapshot, so ``checkpoint.every`` bounds both its
memory (one theta per round, held in the object store) and the work redone
after a loss. Without checkpoints the backend takes a snapshot of its own once
the logged thetas reach :data:`LOG_BYTES_MAX`, so that memory stays bounded
over any number of rounds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray

from pf2lora_ray.runtime.actor import ActorStateLost

LOG_BYTES_MAX = 256 * 2**20  # logged thetas beyond this trigger a snapshot (module docstring)

log = logging.getLogger(__name__)

# Failures after which an actor's clients are restored and their work redone.
LOST = (
    ray.exceptions.RayActorError,
    ray.exceptions.GetTimeoutError,
    ray.exceptions.ObjectLostError,
    ActorStateLost,
)


class Recovery:
    """Snapshot, log, and retrying calls for a backend's actors.

    Args:
        actors: the backend's actor handles (the list itself: a replacement is
            written into it).
        start: ``start(i)`` starts a replacement for actor ``i``.
        clients_of: ``clients_of(i)``: the clients whose home actor ``i`` is now.
        max_retries: ``faults.max_retries``.
        rows_of: ``rows_of(clients)``: their rows of the data, or None (generated data).
        timeout_s: ``faults.restart_timeout_s``: how long to wait for a restarted actor.
    """

    def __init__(
        self,
        actors: list[Any],
        start: Callable[[int], Any],
        clients_of: Callable[[int], list[int]],
        max_retries: int,
        rows_of: Callable[[list[int]], Any],
        timeout_s: float,
    ) -> None:
        self.actors, self.start, self.clients_of = actors, start, clients_of
        self.rows_of = rows_of
        self.max_retries, self.timeout_s = max_retries, timeout_s
        self.snapshot: Any = None  # object ref of {client: state}; None = every client fresh
        self.log: list[tuple[int, Any, set[int]]] = []  # (round, theta ref, clients trained)
        self.log_bytes = 0  # bytes of the thetas the log holds
        self.broken: set[int] = set()  # actors whose last work was dropped
        self.pending_faults: list[str] = []  # met outside a round's train/eval

    def new_snapshot(self, states: dict[int, Any]) -> None:
        """``states`` (every client's) become the restore point; the log starts empty."""
        self.snapshot, self.log, self.log_bytes = ray.put(states), [], 0

    def logged(self, round_: int, theta: Any, clients: Sequence[int], nbytes: int) -> None:
        """Round ``round_``'s training of ``clients`` counted (``theta``: its ref, ``nbytes``)."""
        if clients:
            self.log.append((round_, theta, set(clients)))
            self.log_bytes += nbytes

    @property
    def full(self) -> bool:
        """The log holds more theta bytes than :data:`LOG_BYTES_MAX`: time for a snapshot."""
        return self.log_bytes > LOG_BYTES_MAX

    def gather(
        self, ids: Sequence[int], call: Callable[[int, bool], Any], what: str
    ) -> tuple[dict[int, Any], list[int], list[str]]:
        """``call(i, first)`` on each actor in ``ids``, recovering and redoing lost work.

        ``first`` is False on a redo after recovery (which already restored
        every client of the actor, so nothing is handed over again).

        Returns:
            (results by actor, actors dropped after ``faults.max_retries``
            retries, a description of every failure met).
        """
        refs = {i: None if i in self.broken else call(i, True) for i in ids}
        results: dict[int, Any] = {}
        dropped: list[int] = []
        faults: list[str] = []
        for i in ids:
            ref = refs[i]
            for _ in range(self.max_retries + 1):
                try:
                    if ref is None:
                        replayed = self.recover(i)
                        faults.append(
                            f"{what}: actor {i} restored, replayed rounds {replayed}, work redone"
                        )
                        ref = call(i, False)
                    results[i] = ray.get(ref)
                    self.broken.discard(i)
                    break
                except LOST as err:
                    ref = None
                    faults.append(f"{what}: actor {i} lost ({type(err).__name__})")
            else:
                self.broken.add(i)
                dropped.append(i)
                faults.append(f"{what}: actor {i} dropped after {self.max_retries} retries")
        for message in faults:
            log.warning("faults: %s", message)
        return results, dropped, faults

    def gather_all(
        self, ids: Sequence[int], call: Callable[[int, bool], Any], what: str
    ) -> dict[int, Any]:
        """:meth:`gather` for personal-state transfers, which cannot drop an actor: they raise."""
        results, dropped, faults = self.gather(ids, call, what)
        self.pending_faults += faults
        if dropped:
            names = ", ".join(f"actor {i}" for i in dropped)
            raise RuntimeError(
                f"{names} could not be recovered within faults.max_retries={self.max_retries} "
                "retries; their clients' personal state is in the latest checkpoint "
                "(pf2lora run ... --resume)"
            )
        return results

    def take_faults(self) -> list[str]:
        faults, self.pending_faults = self.pending_faults, []
        return faults

    def recover(self, i: int) -> list[int]:
        """Bring actor ``i`` back to its clients' exact current state; returns rounds replayed."""
        if not self._alive(i):
            # Ray has given up on it (restarts used up): a replacement takes its place.
            ray.kill(self.actors[i], no_restart=True)
            self.actors[i] = self.start(i)
            ray.get(self.actors[i].node_id.remote(), timeout=self.timeout_s)
        clients = self.clients_of(i)
        actor, mine = self.actors[i], set(clients)
        snapshots = [] if self.snapshot is None else [self.snapshot]
        refs = [actor.restore.remote(clients, self.rows_of(clients), *snapshots)]
        replayed = []
        for round_, theta, trained in self.log:
            ks = sorted(mine & trained)
            if ks:
                refs.append(actor.train.remote(theta, round_, ks))
                replayed.append(round_)
        ray.get(refs)
        return replayed

    def _alive(self, i: int) -> bool:
        """Wait while Ray restarts actor ``i``; False if it is dead for good."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                ray.get(self.actors[i].node_id.remote(), timeout=self.timeout_s)
                return True
            except ray.exceptions.ActorDiedError:
                return False
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
