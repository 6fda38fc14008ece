"""Start the embedded local Ray with every server listening on 127.0.0.1 only.

How Ray picks its listen addresses (Ray 2.60; ray-project/ray ``src/ray/rpc/grpc_server.cc``,
``gcs_server.cc``, ``core_worker.cc``, ``dashboard/agent.py``, ``http_server_agent.py``,
``reporter_agent.py``, ``runtime_env/agent/main.py``): the GCS, the raylet (node manager
and object manager), every core worker (drivers and actors), the runtime-env agent, the
dashboard agent (gRPC and HTTP) and the metrics exporter bind ``127.0.0.1`` when the
node's IP address *is* ``127.0.0.1``, and all interfaces (``0.0.0.0`` / ``::``)
otherwise; Ray has no setting to bind one chosen interface. A plain ``ray.init()``
takes the node IP from the route to the outside (``node_ip_address_from_perspective``),
and turns ``_node_ip_address="127.0.0.1"`` into that routable address too
(``services.resolve_ip_for_localhost``), except where Ray's "cluster" flag
``ray_constants.ENABLE_RAY_CLUSTER`` is off (its Windows/macOS default, where Ray keeps
single-machine Ray on loopback to avoid firewall pop-ups). So the embedded default
sets that flag off for the duration of ``ray.init`` and asks for ``127.0.0.1``; an
embedded Ray is one node and needs no outside address. The dashboard, when
``runtime.dashboard`` turns it on, keeps Ray's ``dashboard_host`` default, 127.0.0.1.
``tests/test_loopback.py`` checks the listening sockets, so a Ray that changes
this is noticed.

A Ray cluster (``--address``) is Ray's own: its nodes listen on all interfaces
and token authentication guards them (README, "Running on a Ray cluster").
``RAY_ADDRESS=local`` (Ray's word for "start a new local instance", which the study
driver sets so that each tune starts its own) gets the embedded Ray too: a plain
``ray.init(address="local")`` would listen on every interface.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import ray

LOOPBACK = "127.0.0.1"
NEW_LOCAL = "local"  # Ray's address for "start a new local instance"


def cluster_address(address: str | None) -> str | None:
    """The Ray cluster to connect to: ``address``, else RAY_ADDRESS; None means start an
    embedded local Ray (:func:`init_embedded`), as does Ray's ``local``."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    return None if address == NEW_LOCAL else address


@contextlib.contextmanager
def _single_machine() -> Iterator[None]:
    """Ray's own single-machine mode (node IP = loopback) while the block runs."""
    constants = ray._private.ray_constants
    saved = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = saved


def init_embedded(**kwargs: Any) -> None:
    """``ray.init(**kwargs)`` of a new local Ray whose servers listen on 127.0.0.1 only.

    Token authentication stays Ray's default (on). ``kwargs`` must not carry
    ``address``: connecting to a cluster is plain ``ray.init(address=...)``.
    """
    if kwargs.get("address"):
        raise ValueError("init_embedded starts a local Ray; connect to a cluster with ray.init")
    with _single_machine():
        ray.init(_node_ip_address=LOOPBACK, **kwargs)
