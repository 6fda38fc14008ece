"""``cost``: what PF2LoRA's bilevel step costs a client, against HOMLoRA's plain step.

Variants (same model, adapters on the family's default targets, batch
16 x 64 tokens): PF2LoRA with the unrolled hypergradient, PF2LoRA first-order
(phi' detached), HOMLoRA (rank r only). Each variant runs in a fresh Python
process so that its peak RSS is its own:

- ``s_per_step``: median wall time of one local step on one torch thread (what
  a client gets in a 1-CPU actor), from one-step ``train`` calls after a
  warm-up call; a PF2LoRA step reads two mini-batches, one per level;
- ``peak_rss_delta_mb``: peak RSS during training minus the RSS just before
  it (model and data already built), i.e. activations, autograd graphs
  (the unrolled graph through the lower step) and optimizer state;
- ``trainable_params`` / ``communicated_params``: per client, from the
  algorithm's own accounting (``trainable_names``, ``communicated_names``);
  communicated parameters travel once each way per round as float32.

Full: all-MiniLM-L6-v2 (``model.name=minilm``), 5 timed steps, variants
alternated twice. Quick: the same with 2 timed steps, once.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pf2lora_ray.bench.common import rows_for, rows_needed, text_job, write_sst2_like

VARIANTS: dict[str, dict[str, Any]] = {
    "pf2lora-unrolled": {"algorithm.name": "pf2lora", "pf2lora.hypergrad": "unrolled"},
    "pf2lora-first_order": {"algorithm.name": "pf2lora", "pf2lora.hypergrad": "first_order"},
    "homlora": {"algorithm.name": "homlora"},
}
BATCH, TOKENS, MODEL = 16, 64, "minilm"


def job(data: Path) -> dict[str, Any]:
    return text_job(
        data,
        model=MODEL,
        num_clients=1,
        clients_per_round=1,
        rounds=1,
        local_steps=1,
        train_per_client=2 * BATCH,
        batch_size=BATCH,
        max_length=TOKENS,
    )


def worker(overrides: dict[str, Any], extra: dict[str, Any], steps: int) -> dict[str, float]:
    """Inside the fresh process: build one client, time ``steps`` one-step rounds."""
    import psutil
    import torch

    from pf2lora_ray.client import ClientHost
    from pf2lora_ray.config import build_config

    torch.set_num_threads(1)  # what a client gets inside a 1-CPU actor
    cfg = build_config(overrides, extra=extra)
    host = ClientHost(cfg, [0])
    theta = host.initial_shared()
    params = dict(host.model.named_parameters())
    first = host.task.batch(host.data[0].train, np.arange(BATCH))
    baseline_mb = psutil.Process().memory_info().rss / 2**20
    host.train(theta, 1, [0])  # warm-up: allocator pools, lazy initialisation
    times = []
    for t in range(steps):
        t0 = time.perf_counter()
        host.train(theta, 2 + t, [0])
        times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    count = lambda names: float(sum(params[n].numel() for n in names))  # noqa: E731
    return {
        "s_per_step": float(np.median(times)),
        "s_per_step_min": float(np.min(times)),
        "peak_rss_mb": peak_mb,
        "peak_rss_delta_mb": peak_mb - baseline_mb,
        "trainable_params": count(host.algorithm.trainable_names(host.roles)),
        "communicated_params": count(host.algorithm.communicated_names(host.roles)),
        "batch_tokens": float(first["input_ids"].numel()),
        "torch_threads": float(torch.get_num_threads()),
    }


def run_variant(overrides: dict[str, Any], extra: dict[str, Any], steps: int) -> dict[str, float]:
    """Run :func:`worker` in a fresh interpreter; its JSON result."""
    spec = json.dumps({"overrides": overrides, "extra": extra, "steps": steps})
    done = subprocess.run(
        [sys.executable, "-m", "pf2lora_ray.bench.cost"],
        input=spec,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"cost worker failed ({extra}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool, out: Path) -> list[dict[str, Any]]:
    steps, repeats = (2, 1) if quick else (5, 2)
    data = write_sst2_like(out / "data", rows_needed(1, 2 * BATCH), words=TOKENS + 8)
    overrides = job(data)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for _ in range(repeats):  # alternate A/B/C/A/B/C so drifting load hits all alike
        for name, extra in VARIANTS.items():
            results[name].append(run_variant(overrides, extra, steps))
    rows: list[dict[str, Any]] = []
    medians = {
        name: {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        for name, runs in results.items()
    }
    base = medians["homlora"]
    for name, m in medians.items():
        m["s_per_step_vs_homlora"] = m["s_per_step"] / base["s_per_step"]
        m["peak_rss_delta_vs_homlora"] = m["peak_rss_delta_mb"] / base["peak_rss_delta_mb"]
        m["communicated_kb_per_round"] = m["communicated_params"] * 4 * 2 / 1024
        rows += rows_for(name, m)
    return rows


if __name__ == "__main__":
    spec = json.loads(sys.stdin.read())
    print(json.dumps(worker(spec["overrides"], spec["extra"], spec["steps"])))
