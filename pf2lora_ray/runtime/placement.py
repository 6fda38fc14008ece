"""Which actor runs which client in a round (DESIGN.md, Runtime: placement follows the work).

Pure functions of their inputs, so a round's placement is deterministic given
the seed (which fixes the sampled clients and their cost estimates), the round
(through the homes earlier rounds left) and the number of actors.

- :func:`static_blocks`: contiguous blocks of clients, one per actor; every
  client's first home, and the whole placement of ``placement="static"``.
- :func:`balance`: longest-processing-time first (LPT) on per-client cost
  estimates, keeping a client on its home actor whenever that does not make the
  round longer than plain LPT would, so only the surplus moves.
- :func:`spread`: every client for an evaluation round, evenly over the actors
  (same rule with equal costs).
- :func:`efficiency` / :func:`replay`: how busy a placement keeps the actors;
  the ``partial`` bench replays measured per-client times on more actors.

Results never depend on placement: each client's update depends only on theta,
its own state and (seed, round, client), and the driver sums the actors'
partial sums in a fixed order.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Plan:
    """One round's placement.

    Attributes:
        clients: actor -> its clients this round (ascending), only actors with work.
        moves: (from actor, to actor) -> clients whose state moves before the work.
    """

    clients: dict[int, list[int]]
    moves: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    @property
    def moved(self) -> int:
        return sum(len(ks) for ks in self.moves.values())


def static_blocks(num_clients: int, num_actors: int) -> list[list[int]]:
    """Clients 0..n-1 in ``num_actors`` contiguous blocks, sizes differing by at most one."""
    return [[int(k) for k in b] for b in np.array_split(np.arange(num_clients), num_actors)]


def lpt_makespan(costs: Sequence[float], num_actors: int) -> float:
    """The longest actor load of plain LPT (no homes): a bound the home preference keeps."""
    loads = [0.0] * num_actors
    for c in sorted(costs, reverse=True):
        heapq.heapreplace(loads, loads[0] + c)
    return max(loads)


def balance(costs: Mapping[int, float], home: Mapping[int, int], num_actors: int) -> Plan:
    """Assign clients to actors balancing their summed cost, preferring each client's home.

    Two passes over the clients in LPT order (cost descending, then id):

    1. a client stays home if its home's load stays within plain LPT's makespan;
    2. the rest go, in the same order, to the least-loaded actor (lowest index
       on ties).

    Args:
        costs: client -> estimated cost of its round (any positive unit).
        home: client -> the actor holding its state now.
        num_actors: how many actors there are.

    Returns:
        The plan, deterministic in its arguments.
    """
    order = sorted(costs, key=lambda k: (-costs[k], k))
    bound = lpt_makespan([costs[k] for k in order], num_actors) * (1 + 1e-9)
    loads = [0.0] * num_actors
    where: dict[int, int] = {}
    for k in order:
        h = home[k]
        if loads[h] + costs[k] <= bound:
            where[k] = h
            loads[h] += costs[k]
    for k in order:
        if k not in where:
            i = min(range(num_actors), key=lambda a: (loads[a], a))
            where[k] = i
            loads[i] += costs[k]
    return _plan(where, home)


def spread(client_ids: Sequence[int], home: Mapping[int, int], num_actors: int) -> Plan:
    """Every client in ``client_ids`` evenly over the actors (equal costs), preferring homes."""
    return balance(dict.fromkeys(client_ids, 1.0), home, num_actors)


def stay(client_ids: Sequence[int], home: Mapping[int, int]) -> Plan:
    """Every client on its home actor (static placement: nothing moves)."""
    return _plan({int(k): home[int(k)] for k in client_ids}, home)


def _plan(where: Mapping[int, int], home: Mapping[int, int]) -> Plan:
    clients: dict[int, list[int]] = {}
    moves: dict[tuple[int, int], list[int]] = {}
    for k in sorted(where):
        clients.setdefault(where[k], []).append(k)
        if where[k] != home[k]:
            moves.setdefault((home[k], where[k]), []).append(k)
    return Plan(dict(sorted(clients.items())), dict(sorted(moves.items())))


def efficiency(loads: Sequence[float], num_actors: int) -> float:
    """Busy share of the actors: total work / (actors x the busiest actor's work)."""
    busiest = max(loads, default=0.0)
    return float(sum(loads) / (num_actors * busiest)) if busiest > 0 else 1.0


def loads_of(plan: Plan, seconds: Mapping[int, float], num_actors: int) -> list[float]:
    """Each actor's summed client seconds under ``plan``."""
    loads = [0.0] * num_actors
    for i, ks in plan.clients.items():
        loads[i] = float(sum(seconds[k] for k in ks))
    return loads


def replay(
    rounds: Sequence[Mapping[int, float]],
    num_clients: int,
    num_actors: int,
    balanced: bool,
    costs: Mapping[int, float] | None = None,
) -> list[float]:
    """Per-round efficiency of a placement on ``num_actors`` actors, from measured client seconds.

    Args:
        rounds: per round, sampled client -> its measured local-update seconds.
        num_clients: clients in the run (static blocks split them).
        num_actors: actors to simulate.
        balanced: :func:`balance` (homes carried between rounds) instead of
            static blocks.
        costs: client -> the cost estimate :func:`balance` places by, as the
            backend does (default: the measured seconds themselves, an oracle).
    """
    home = {k: i for i, b in enumerate(static_blocks(num_clients, num_actors)) for k in b}
    out = []
    for seconds in rounds:
        by = {k: costs[k] for k in seconds} if costs is not None else seconds
        plan = balance(by, home, num_actors) if balanced else stay(list(seconds), home)
        for i, ks in plan.clients.items():
            home.update(dict.fromkeys(ks, i))
        out.append(efficiency(loads_of(plan, seconds, num_actors), num_actors))
    return out
