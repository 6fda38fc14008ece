"""In-process backend: one :class:`ClientHost` runs every client sequentially.

The reference that Ray results must match, and the easiest place to debug.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from pf2lora_ray.client import Arrays, ClientHost, EvalResult, TrainResult, peak_rss_mb, rss_mb
from pf2lora_ray.config import Config
from pf2lora_ray.runtime.base import stream_chunks
from pf2lora_ray.tasks.base import ClientRows


class LocalBackend:
    """All clients in this process, one frozen model.

    Args:
        cfg: the run's config.
        rows: every client's rows (the driver's data check), or None: the host
            draws the partition itself (or generates its clients' data).
    """

    num_actors = 0

    def __init__(self, cfg: Config, rows: ClientRows | None = None) -> None:
        if cfg.runtime.threads_per_actor:  # same knob as a Ray actor's torch threads
            torch.set_num_threads(cfg.runtime.threads_per_actor)
        self.host = ClientHost(cfg, range(cfg.fed.num_clients), rows=rows)

    def initial_shared(self) -> Arrays:
        return self.host.initial_shared()

    def train(self, theta: Arrays, round_: int, client_ids: Sequence[int]) -> TrainResult:
        return self.host.train(theta, round_, client_ids)

    def evaluate(
        self, theta: Arrays, round_: int, on_chunk: Callable[[EvalResult], None] | None = None
    ) -> EvalResult:
        ids, size = self.host.client_ids, self.host.cfg.runtime.eval_chunk
        chunks = [
            lambda part=ids[i : i + size]: self.host.evaluate(theta, round_, part)
            for i in range(0, len(ids), size)
        ]
        return stream_chunks(chunks, on_chunk)

    def get_personal(self) -> dict[int, Arrays]:
        return self.host.get_personal()

    def snapshot(self) -> dict[int, Arrays]:
        return self.host.get_personal()

    def set_personal(self, states: dict[int, Arrays]) -> None:
        self.host.set_personal(states)

    def placement_state(self) -> Arrays:
        return {}  # one host holds every client

    def restore_placement(self, saved: Arrays) -> bool:
        return False

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def rss_mb(self) -> float:
        return rss_mb()

    def round_stats(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.host.personal.close()
