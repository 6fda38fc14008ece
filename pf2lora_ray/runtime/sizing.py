"""How many client actors, and where: Ray start-up and sizing against free resources.

How many actors: ``resources.num_actors``, else ``ceil(num_clients /
resources.clients_per_actor)``, else as many as the free resources allow (inside
a Tune trial: one per actor bundle of the trial's placement group). A config
that cannot be placed is a :class:`ConfigError` raised before any actor starts,
because an actor that never fits waits forever without a word.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pf2lora_ray.config import Config, ConfigError
from pf2lora_ray.runtime.loopback import cluster_address, init_embedded

_EPS = 1e-9  # fractional resources: 1.0 / 0.1 must count as 10 actors, not 9
# Ray's start-up notices (e.g. that token authentication is on) that --quiet keeps
# off the terminal; token authentication itself stays on.
NOTICE_LOGGERS = ("ray._private.authentication",)


@contextlib.contextmanager
def _notices_silenced(quiet: bool) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in NOTICE_LOGGERS] if quiet else []
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


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
    address = cluster_address(cfg.runtime.address)
    with _notices_silenced(quiet):
        if address:
            ray.init(address=address, **common)
        else:
            # Every server on 127.0.0.1; token authentication stays Ray's default (on).
            init_embedded(include_dashboard=cfg.runtime.dashboard, **common)
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


def actor_slots(cfg: Config) -> list[Any]:
    """One scheduling strategy per actor: the trial's bundles inside Tune, else the cluster."""
    from ray.util.placement_group import get_current_placement_group

    pg = get_current_placement_group()
    return _bundle_slots(cfg, pg) if pg is not None else _cluster_slots(cfg)
