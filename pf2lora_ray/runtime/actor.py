"""The Ray actor around a :class:`~pf2lora_ray.client.ClientHost` (thin: every method delegates).

An actor builds the frozen base model once and keeps the personal state of the
clients whose home it is, and their rows of the data (the driver's partition,
:class:`~pf2lora_ray.tasks.base.Rows`; None for generated data): only theirs.
Clients move between actors with their state and rows
(:meth:`ClientActor.take_state` on the giver, the object ref passed to the
receiver's next call), so any actor can serve any client.

Ray restarts a dead actor (``max_restarts``) by running ``__init__`` again, with
none of its clients' state. An actor therefore starts *disarmed* and refuses
work until the driver arms it: :meth:`ClientActor.arm` right after creation
(every client starts from its initial state, drawn from (seed, client)) or
:meth:`ClientActor.restore` after a loss. A restarted actor is disarmed again
without asking Ray: ``RuntimeContext.was_current_actor_reconstructed`` emits a
RayDeprecationWarning in Ray 2.60 (it reads the deprecated ``actor_id``), and
its public successor, ``ray.util.state.get_actor(...).num_restarts``, needs
the dashboard, which simulations run without.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ray
import torch

from pf2lora_ray.client import (
    Arrays,
    ClientHost,
    EvalResult,
    Handover,
    TrainResult,
    peak_rss_mb,
    rss_mb,
)
from pf2lora_ray.config import Config
from pf2lora_ray.tasks.base import ClientRows

CRASH_EXIT_CODE = 1  # what an actor exits with when faults.kill_actor_at_round fires
States = dict[int, Arrays]


class ActorStateLost(RuntimeError):
    """A restarted client actor was asked to use personal state it no longer holds."""


def client_cost(cfg: Config, data: Any) -> float:
    """A client's estimated round cost: local steps x tokens per batch (any unit, same for all).

    Tokens per batch = min(batch size, training rows) x the mean length of the
    client's tokenized training rows (1 per row for tasks without tokens).
    """
    rows = getattr(data.train, "rows", None)
    lengths = [len(r["input_ids"]) for r in rows if "input_ids" in r] if rows else []
    per_row = sum(lengths) / len(lengths) if lengths else 1.0
    return float(cfg.fed.local_steps * min(cfg.data.batch_size, len(data.train)) * per_row)


def merged(parts: Sequence[States | None]) -> States:
    """Client states from several hand-overs or snapshots, as one dict."""
    out: States = {}
    for part in parts:
        out.update(part or {})
    return out


@ray.remote
class ClientActor:
    """A :class:`ClientHost` in its own Ray worker.

    Args:
        cfg: the run's config.
        index: this actor's place in the backend's list (for messages).
        client_ids: the clients it is home to at start (their data is loaded now).
        threads: torch intra-op threads; set here because Ray's OMP_NUM_THREADS
            is not honoured by a reused worker that already imported torch.
        rows: the rows of ``client_ids`` and of no other client; None when the
            driver has none (generated data, or an unchecked run).
    """

    def __init__(
        self,
        cfg: Config,
        index: int,
        client_ids: Sequence[int],
        threads: int,
        rows: ClientRows | None = None,
    ) -> None:
        torch.set_num_threads(threads)
        self.index = index
        self.host = ClientHost(cfg, client_ids, rows=rows)
        self.armed = False  # see the module docstring

    def arm(self) -> None:
        """A new actor's clients start from their initial state."""
        self.armed = True

    def initial_shared(self) -> Arrays:
        return self.host.initial_shared()

    def cost_estimates(self) -> dict[int, float]:
        """:func:`client_cost` of every client whose data this actor holds."""
        return {k: client_cost(self.host.cfg, d) for k, d in sorted(self.host.data.items())}

    def train(
        self,
        theta: Arrays,
        round_: int,
        client_ids: Sequence[int],
        *incoming: Handover,
        crash: bool = False,
    ) -> tuple[TrainResult, int]:
        """Take in ``incoming`` clients' state and rows, then train ``client_ids``.

        ``incoming`` are object refs Ray resolves before the call runs: if the
        giving actor died before handing over, this call fails too and the
        driver recovers this actor. ``crash`` (fault injection) exits the
        process after the first client has trained.

        Returns:
            (the pre-summed result, bytes of personal state taken in).
        """
        host = self._intact()
        received = self._take_in(incoming)
        if crash:
            host.train(theta, round_, client_ids[:1])
            os._exit(CRASH_EXIT_CODE)
        return host.train(theta, round_, client_ids), received

    def evaluate(
        self, theta: Arrays, round_: int, client_ids: Sequence[int], *incoming: Handover
    ) -> tuple[EvalResult, int]:
        """Take in ``incoming`` clients' state and rows, then evaluate ``client_ids``."""
        received = self._take_in(incoming)
        return self.host.evaluate(theta, round_, client_ids), received

    def _take_in(self, incoming: Sequence[Handover]) -> int:
        """Serve the handed-over clients; returns the bytes of personal state taken in."""
        host = self._intact()
        for handed in incoming:
            host.take_over(handed)
        states = [a for handed in incoming for s in handed.states.values() for a in s.values()]
        return sum(a.nbytes for a in states)

    def take_state(self, client_ids: Sequence[int]) -> Handover:
        """Hand over ``client_ids``: their whole personal state and rows, dropped here."""
        return self._intact().hand_over(client_ids)

    def get_personal(self, client_ids: Sequence[int]) -> States:
        """Every given client's personal state (created from (seed, client) if it has none)."""
        return self._intact().get_personal(client_ids)

    def set_personal(self, states: States, complete: bool) -> None:
        """Overwrite the given clients' state; ``complete``: these are all its clients."""
        self.host.put_state(states)
        self.armed = self.armed or complete

    def restore(
        self, client_ids: Sequence[int], rows: ClientRows | None, *snapshots: States | None
    ) -> None:
        """Hold exactly ``client_ids``, each from the snapshots (absent: its initial state).

        ``rows`` are theirs (None: no rows); other clients' data and rows are dropped,
        as :meth:`take_state` drops them.
        """
        states = merged(snapshots)
        self.host.personal.clear()
        self.host.put_state({k: states[k] for k in client_ids if k in states})
        self.host.client_ids = sorted(int(k) for k in client_ids)
        self.host.data.drop(set(self.host.data) - set(self.host.client_ids))
        self.host.data.rows = None if rows is None else dict(rows)
        self.armed = True

    def held(self) -> list[int]:
        """The clients whose personal state this actor holds (for checks)."""
        return list(self.host.personal)

    def rows_held(self) -> list[int]:
        """The clients whose rows this actor holds, ascending (for checks)."""
        return sorted(self.host.data.rows or {})

    def release(self) -> None:
        """Remove this actor's spill folder (before it is killed, which skips finalizers)."""
        self.host.personal.close()

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def rss_mb(self) -> float:
        return rss_mb()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def _intact(self) -> ClientHost:
        if not self.armed:
            raise ActorStateLost(
                f"actor {self.index} was restarted and lost its clients' personal state; "
                "restore them (RayBackend recovers it from the latest snapshot) before use"
            )
        return self.host


def actor_options(cfg: Config, strategy: Any) -> dict[str, Any]:
    """Ray options of every client actor (resources, restarts, where it may run)."""
    return {
        "num_cpus": cfg.resources.num_cpus_per_actor,
        "num_gpus": cfg.resources.num_gpus_per_actor,
        "max_restarts": cfg.faults.max_retries,
        "scheduling_strategy": strategy,
    }
