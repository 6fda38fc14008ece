"""The embedded local Ray listens on 127.0.0.1 only, with token authentication on.

A plain ``ray.init()`` binds the GCS, the raylet, workers and agents on every
interface (its node IP is the machine's routable address); the runtime's
embedded default must not (pf2lora_ray/runtime/loopback.py says how). `pf2lora run` and
`pf2lora tune` both start Ray through ``start_ray``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import psutil
import pytest

ray = pytest.importorskip("ray")

from pf2lora_ray.config import load_config  # noqa: E402
from pf2lora_ray.runtime.sizing import start_ray  # noqa: E402

JOB = Path(__file__).resolve().parents[1] / "jobs" / "synthetic_rank.yaml"

pytestmark = pytest.mark.ray


def listening(pid: int) -> dict[str, set[str]]:
    """Listening TCP addresses of ``pid`` and its descendants, by process name."""
    me = psutil.Process(pid)
    found: dict[str, set[str]] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.Error:  # a worker that exited meanwhile
            continue
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN:
                found.setdefault(name, set()).add(conn.laddr.ip)
    return found


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or addr).is_loopback


@pytest.mark.parametrize("env_address", [None, "local"])  # the study driver sets local
def test_embedded_ray_listens_on_loopback_only(env_address, monkeypatch):
    ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if env_address:
        monkeypatch.setenv("RAY_ADDRESS", env_address)
    cfg = load_config(JOB, ["runtime.quiet=true"])
    assert start_ray(cfg)
    try:

        @ray.remote(num_cpus=0)
        def node_ip() -> str:  # starts a worker, so a worker's server is listening too
            return ray.util.get_node_ip_address()

        assert ray.get(node_ip.remote()) == "127.0.0.1"
        sockets = listening(psutil.Process().pid)
        names = " ".join(sockets)
        assert "gcs_server" in names and "raylet" in names, sockets  # Ray's own were seen
        exposed = {name: ips for name, ips in sockets.items() if not all(map(is_loopback, ips))}
        assert not exposed, f"listening beyond 127.0.0.1: {exposed}"
        # Token authentication stays Ray's default for the embedded cluster.
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        assert is_token_auth_enabled()
    finally:
        ray.shutdown()
