"""``cost``: what PF2LoRA's bilevel step costs a client, against HOMLoRA's plain step.

Variants (same model, adapters on the family's default targets, batch
16 x 64 tokens), with the forward/backward passes one local step makes
(``passes``; a double-backward pass counted as one pass plus its extra graph):

- ``pf2lora-paper-autograd`` (default): Algorithm 1, four batches; lower step,
  grad_x at y+, grad_y at y+, and the mixed term by double backward over two
  half-batch slices of zeta (``pf2lora.hvp_chunks=2``): 3 + 1 passes;
- ``pf2lora-paper-autograd-1chunk``: the same with the double backward over the
  whole of zeta at once (``hvp_chunks=1``);
- ``pf2lora-paper-fd``: the same with the mixed term as a central difference of
  grad_x at y +- eps v: 5 plain passes, no double backward;
- ``pf2lora-shared_batches``: the first implementation, one graph through the
  lower step (create_graph) and the upper loss: 2 passes, the second a double
  backward that also keeps the lower step's graph alive;
- ``pf2lora-first_order``: lower step + grad_x at y+ (the ablation): 2 passes;
- ``homlora``: 1 pass.

Each variant runs twice, each time in a fresh Python process:

- ``s_per_step``: median wall time of one local step on one torch thread (what
  a client gets in a 1-CPU actor), from one-step ``train`` calls after a
  warm-up call, with the default allocator;
- ``peak_rss_delta_mb``: peak RSS during one step minus the RSS just before
  it (model and data already built): activations, autograd graphs and
  optimizer state, the memory a client's step adds to its actor. Measured in
  a second process with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc maps
  every large block (activations) on its own and returns it on free: RSS then
  follows the live tensors instead of what the heap kept from earlier passes
  (with the default allocator, a variant that makes more passes keeps more
  freed memory and looks bigger than it is). That setting slows allocation,
  which is why time is measured in the other process;
- ``trainable_params`` / ``communicated_params``: per client, from the
  algorithm's own accounting (``trainable_names``, ``communicated_names``);
  communicated parameters travel once each way per round as float32.

Full: all-MiniLM-L6-v2 (``model.name=minilm``), 5 timed steps, variants
alternated twice. Quick: the same with 2 timed steps, once.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pf2lora_ray.bench.common import rows_for, rows_needed, text_job, write_sst2_like

PF2LORA = {"algorithm.name": "pf2lora"}
VARIANTS: dict[str, dict[str, Any]] = {
    "pf2lora-paper-autograd": {**PF2LORA, "pf2lora.estimator": "paper", "pf2lora.hvp": "autograd"},
    "pf2lora-paper-autograd-1chunk": {
        **PF2LORA, "pf2lora.estimator": "paper", "pf2lora.hvp": "autograd", "pf2lora.hvp_chunks": 1,
    },
    "pf2lora-paper-fd": {
        **PF2LORA, "pf2lora.estimator": "paper", "pf2lora.hvp": "finite_difference",
    },
    "pf2lora-shared_batches": {**PF2LORA, "pf2lora.estimator": "shared_batches"},
    "pf2lora-first_order": {**PF2LORA, "pf2lora.hypergrad": "first_order"},
    "homlora": {"algorithm.name": "homlora"},
}
# Forward/backward passes per local step (module docstring); double backward counts once.
PASSES = {
    "pf2lora-paper-autograd": 4,
    "pf2lora-paper-autograd-1chunk": 4,
    "pf2lora-paper-fd": 5,
    "pf2lora-shared_batches": 2,
    "pf2lora-first_order": 2,
    "homlora": 1,
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
        train_per_client=4 * BATCH,
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


MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # large blocks mapped and unmapped one by one
MEMORY_KEYS = ("peak_rss_mb", "peak_rss_delta_mb")


def run_variant(overrides: dict[str, Any], extra: dict[str, Any], steps: int) -> dict[str, float]:
    """Time in one fresh interpreter, memory in another (:data:`MEMORY_ENV`); merged results."""
    timed = _spawn(overrides, extra, steps, {})
    memory = _spawn(overrides, extra, 1, MEMORY_ENV)
    timed.update({k: memory[k] for k in MEMORY_KEYS})
    return timed


def _spawn(
    overrides: dict[str, Any], extra: dict[str, Any], steps: int, env: dict[str, str]
) -> dict[str, float]:
    """Run :func:`worker` in a fresh interpreter with ``env`` added; its JSON result."""
    spec = json.dumps({"overrides": overrides, "extra": extra, "steps": steps})
    done = subprocess.run(
        [sys.executable, "-m", "pf2lora_ray.bench.cost"],
        input=spec,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )
    if done.returncode != 0:
        raise RuntimeError(f"cost worker failed ({extra}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool, out: Path) -> list[dict[str, Any]]:
    steps, repeats = (2, 1) if quick else (5, 2)
    data = write_sst2_like(out / "data", rows_needed(1, 4 * BATCH), words=TOKENS + 8)
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
        m["passes_per_step"] = float(PASSES[name])
        rows += rows_for(name, m)
    return rows


if __name__ == "__main__":
    spec = json.loads(sys.stdin.read())
    print(json.dumps(worker(spec["overrides"], spec["extra"], spec["steps"])))
