"""Check a Ray address before connecting, so a wrong one fails in seconds, not minutes.

``ray.init(address="127.0.0.1:1")`` keeps retrying the GCS for minutes and ends
in a traceback. Before anything is written or any actor starts, the driver
opens one TCP connection to the address's host and port; nothing answering
there is a :class:`UsageError` naming the address. An address that answers
but is not a Ray head is left to ``ray.init``.
"""

from __future__ import annotations

import os
import socket
import sys

from pf2lora_ray.validate import UsageError

PROBE_TIMEOUT_S = 5.0
# Addresses that name no socket: "auto" reads the local cluster file, "local" starts one.
_NO_SOCKET = ("", "auto", "local")


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``address`` (``host:port``, ``ray://host:port``), or None if it has none.

    Raises:
        UsageError: the address has a host but no valid port.
    """
    text = address.strip()
    if text.lower() in _NO_SOCKET:
        return None
    scheme, sep, rest = text.partition("://")
    if sep and scheme not in ("ray", "rays"):
        raise UsageError(
            f"runtime.address {address}: a Ray address is host:port of the head's GCS (default "
            "port 6379) or ray://host:10001; http://HEAD:8265 is for `ray job submit`"
        )
    hostport = rest if sep else text
    host, colon, port = hostport.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"runtime.address {address}: expected host:port, e.g. 10.0.0.5:6379")
    return host.strip("[]") or "127.0.0.1", int(port)


def check_address(address: str | None) -> None:
    """Raise UsageError unless something listens at ``address`` (or RAY_ADDRESS).

    No address (the embedded local Ray) and ``auto`` are not checked, nor is
    anything once this process is connected (a Tune trial, a job's driver).
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or ""
    target = host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UsageError(
            f"runtime.address {address}: no Ray cluster answers there ({reason}); start one with "
            "`ray start --head` or drop --address / RAY_ADDRESS to run on an embedded local Ray"
        ) from err
