"""What the driver needs from a backend, whichever runs the clients."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from pf2lora_ray.client import Arrays, EvalResult, TrainResult


class Backend(Protocol):
    """Runs client hosts; the driver loop is the same for every backend."""

    num_actors: int

    def initial_shared(self) -> Arrays:
        """theta_0, identical whichever host computes it."""

    def train(self, theta: Arrays, round_: int, client_ids: Sequence[int]) -> TrainResult:
        """Local updates of the sampled clients, combined into one pre-summed result."""

    def evaluate(
        self, theta: Arrays, round_: int, on_chunk: Callable[[EvalResult], None] | None = None
    ) -> EvalResult:
        """Every client's personalized model on its test split.

        Clients are visited ``runtime.eval_chunk`` at a time (per actor). When
        that takes more than one chunk and ``on_chunk`` is given, each chunk's
        result goes to ``on_chunk`` as soon as it is scored, and the returned
        result is ``streamed``: its metric rows whole, its rank rows left out.
        """

    def get_personal(self) -> dict[int, Arrays]:
        """Every client's personal state (read only)."""

    def snapshot(self) -> dict[int, Arrays]:
        """Every client's personal state for a checkpoint; also the backend's restore point."""

    def set_personal(self, states: dict[int, Arrays]) -> None:
        """Restore personal state (from a checkpoint)."""

    def placement_state(self) -> Arrays:
        """Which actor is home to which client, as arrays for a checkpoint (empty: no actors)."""

    def restore_placement(self, saved: Arrays) -> bool:
        """Make a checkpoint's placement current (before :meth:`set_personal`); False: kept own."""

    def peak_rss_mb(self) -> float:
        """Peak RSS summed over the processes that hold clients."""

    def rss_mb(self) -> float:
        """Current RSS summed over the processes that hold clients (can shrink, unlike the peak)."""

    def round_stats(self) -> dict[str, Any]:
        """The last round's placement (per-actor clients and seconds, state moved)."""

    def close(self) -> None:
        """Release hosts/actors."""


def check_same_tensors(parts: Sequence[TrainResult]) -> None:
    """Every contribution must hold the same tensor names and shapes as the first.

    Raises:
        ValueError: naming the tensor (or names) that differ and the clients that sent them.
    """
    first = parts[0]
    want = {k: np.shape(v) for k, v in first.summed.items()}
    for p in parts[1:]:
        got = {k: np.shape(v) for k, v in p.summed.items()}
        if got.keys() != want.keys():
            extra, missing = sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys())
            raise ValueError(
                f"contribution of clients {p.clients} has tensors {extra} that clients "
                f"{first.clients} did not send and lacks {missing}; every host must send the "
                "same names"
            )
        for name, shape in want.items():
            if got[name] != shape:
                raise ValueError(
                    f"tensor {name!r}: clients {p.clients} sent shape {got[name]}, clients "
                    f"{first.clients} sent {shape}; every host must send the same shapes"
                )


def combine(parts: Sequence[TrainResult]) -> TrainResult:
    """Sum hosts' partial results in a fixed order (ascending first client id).

    Raises:
        ValueError: the parts do not hold the same tensor names and shapes.
    """
    parts = sorted(parts, key=lambda p: p.clients[0] if p.clients else -1)
    check_same_tensors(parts)
    names = sorted(parts[0].summed)
    summed = {k: np.sum([p.summed[k] for p in parts], axis=0) for k in names}
    rows = sorted((r for p in parts for r in p.rows), key=lambda r: (r["client_id"], r["metric"]))
    return TrainResult(
        summed=summed,
        weight=float(sum(p.weight for p in parts)),
        clients=sorted(k for p in parts for k in p.clients),
        rows=rows,
        compute_s=sum(p.compute_s for p in parts),
        peak_rss_mb=sum(p.peak_rss_mb for p in parts),
        client_s={k: s for p in parts for k, s in sorted(p.client_s.items())},
        spilled_bytes=sum(p.spilled_bytes for p in parts),
        read_bytes=sum(p.read_bytes for p in parts),
    )


def combine_eval(parts: Sequence[EvalResult]) -> EvalResult:
    """Concatenate hosts' evaluation rows, sorted by client."""
    key = lambda r: (r["client_id"], r.get("metric", r.get("layer")))  # noqa: E731
    return EvalResult(
        rows=sorted((r for p in parts for r in p.rows), key=key),
        ranks=sorted((r for p in parts for r in p.ranks), key=key),
        compute_s=sum(p.compute_s for p in parts),
        cpu_s=sum(p.cpu_s for p in parts),
        peak_rss_mb=sum(p.peak_rss_mb for p in parts),
        dropped=sorted(k for p in parts for k in p.dropped),
        faults=[f for p in parts for f in p.faults],
        spilled_bytes=sum(p.spilled_bytes for p in parts),
        read_bytes=sum(p.read_bytes for p in parts),
    )


def stream_chunks(
    chunks: Sequence[Callable[[], EvalResult]], on_chunk: Callable[[EvalResult], None] | None
) -> EvalResult:
    """Score ``chunks`` in turn (each a call returning one chunk's result), streaming them.

    With one chunk, or no ``on_chunk``, the result is the chunks combined. Otherwise
    every chunk goes to ``on_chunk`` when scored and only its metric rows are kept
    (a few per client; the rank rows, a dozen per client, are not), so the memory
    of an evaluation of every client does not grow with their ranks.
    """
    if len(chunks) <= 1 or on_chunk is None:
        return combine_eval([score() for score in chunks])
    out = EvalResult(streamed=True)
    for score in chunks:
        part = score()
        on_chunk(part)
        out.rows += part.rows
        out.compute_s += part.compute_s
        out.cpu_s += part.cpu_s
        out.peak_rss_mb = max(out.peak_rss_mb, part.peak_rss_mb)
        out.dropped += part.dropped
        out.faults += part.faults
        out.spilled_bytes += part.spilled_bytes
        out.read_bytes += part.read_bytes
    out.dropped.sort()
    return out
