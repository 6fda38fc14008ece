"""What every benchmark shares: machine facts, the text workload, timing, the result table.

A benchmark returns rows ``{"variant", "metric", "value"}``; :func:`finish` adds
the bench name and the machine columns, writes ``OUT/bench.parquet`` atomically
and prints a Markdown table. Metric names carry their unit (``s_per_round``,
``peak_rss_mb``).

The text workload (:func:`write_sst2_like`, :func:`text_job`) is a synthetic
SST-2-like sentiment set written into the bench's own folder, so every bench
runs offline on any machine, reads the same bytes on both sides of a
comparison, and costs no time reading a large corpus.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pf2lora_ray import seeds
from pf2lora_ray.driver import DriverState, RoundReport
from pf2lora_ray.results import write_parquet

MACHINE_COLUMNS = [
    "cores",
    "memory_gb",
    "cpu_model",
    "python_version",
    "torch_version",
    "ray_version",
    "transformers_version",
    "load_avg_1m",
    "date",
]
COLUMNS = ["bench", "variant", "metric", "value", *MACHINE_COLUMNS]

_POSITIVE = ("good", "great", "fine", "superb", "charming", "moving", "lovely", "warm", "funny")
_NEGATIVE = ("bad", "dull", "awful", "boring", "weak", "clumsy", "bleak", "tedious", "flat")
_NEUTRAL = ("the", "film", "story", "cast", "plot", "a", "of", "and", "its", "with", "scene")


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """The machine columns of every result row (load average: other work on the machine)."""
    import psutil

    return {
        "cores": cores(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": _cpu_model(),
        "python_version": platform.python_version(),
        "torch_version": _version("torch"),
        "ray_version": _version("ray"),
        "transformers_version": _version("transformers"),
        "load_avg_1m": os.getloadavg()[0],
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# A fixed single-threaded torch kernel; each copy starts at the same wall-clock instant.
_KERNEL = """
import sys, time, torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
t = time.perf_counter()
for _ in range({iters}):
    a @ a
print(time.perf_counter() - t)
"""


def _kernel_seconds(copies: int, iters: int) -> list[float]:
    start = time.time() + 3.0  # after every copy has imported torch
    code = _KERNEL.format(iters=iters)
    cmd = [sys.executable, "-c", code, str(start)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    return [float(p.communicate()[0]) for p in procs]


def parallel_speedup(n: int, iters: int = 3000, repeats: int = 2) -> dict[str, float]:
    """How much faster ``n`` concurrent processes get through ``n`` fixed kernels than one.

    The machine's own ceiling for a simulation on ``n`` processes: ``n`` on ``n``
    idle, independent cores; less when the cores are shared (other tenants, a
    hypervisor, SMT siblings) or the kernel is memory-bound.
    """
    alone = np.median([_kernel_seconds(1, iters)[0] for _ in range(repeats)])
    together = np.median([max(_kernel_seconds(n, iters)) for _ in range(repeats)])
    return {
        "machine_kernel_alone_s": float(alone),
        "machine_parallel_speedup": float(n * alone / together),
    }


def start_ray(num_cpus: int) -> float:
    """Start a quiet embedded Ray with ``num_cpus`` CPUs; returns the seconds it took.

    The runtime reuses an initialised Ray, so benches time ``ray.init`` apart
    from the rounds. The caller shuts it down.
    """
    import logging

    import ray

    from pf2lora_ray.runtime.loopback import init_embedded

    t0 = time.perf_counter()
    for attempt in range(3):
        try:
            init_embedded(
                num_cpus=num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
            break
        except Exception as err:  # Ray raises a bare Exception for this
            # Ray gives its raylet a fixed 30 s to register; a loaded machine (benches
            # run at nice 19 beside other work) can miss it, and a second try succeeds.
            if "timed out during startup" not in str(err) or attempt == 2:
                raise
            ray.shutdown()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- workload


def write_sst2_like(folder: str | Path, rows: int, words: int = 12, seed: int = 0) -> Path:
    """A GLUE-format SST-2-like ``train.tsv`` of ``rows`` sentences; returns the folder.

    Each sentence has ``words`` words: neutral filler plus sentiment words; the
    label is 1 when positive words outnumber negative ones (ties broken by the
    first sentiment word), so the task is learnable but not trivial.
    """
    rng = seeds.rng(seed, seeds.BENCH_DATA)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["sentence\tlabel"]
    for _ in range(rows):
        n_sent = int(rng.integers(1, max(2, words // 3)))
        signs = rng.integers(0, 2, size=n_sent)
        sentiment = [str(rng.choice(_POSITIVE if s else _NEGATIVE)) for s in signs]
        filler = [str(w) for w in rng.choice(_NEUTRAL, size=words - n_sent)]
        sentence = filler + sentiment
        rng.shuffle(sentence)
        label = int(2 * signs.sum() > n_sent or (2 * signs.sum() == n_sent and signs[0] == 1))
        lines.append(f"{' '.join(sentence)} .\t{label}")
    (folder / "train.tsv").write_text("\n".join(lines) + "\n")
    return folder


def text_job(
    data_path: str | Path,
    *,
    model: str = "tiny-bert",
    algorithm: str = "pf2lora",
    num_clients: int,
    clients_per_round: int,
    rounds: int,
    local_steps: int,
    train_per_client: int,
    test_per_client: int = 8,
    batch_size: int = 16,
    max_length: int = 48,
) -> dict[str, Any]:
    """Nested config overrides of a GLUE-SST-2-format text job on ``data_path``.

    Evaluation runs only in the last round (the driver always evaluates the
    last one), so the other rounds time training alone.
    """
    return {
        "seed": 0,
        "model": {"name": model},
        "data": {
            "name": "glue",
            "task": "sst2",
            "path": str(Path(data_path).resolve()),  # Ray workers may run elsewhere
            "partition": "iid",
            "max_length": max_length,
            "batch_size": batch_size,
            "max_train_per_client": train_per_client,
            "max_test_per_client": test_per_client,
        },
        "adapter": {"r": 8, "r_personal": 2, "alpha": 16.0},
        "fed": {
            "num_clients": num_clients,
            "clients_per_round": clients_per_round,
            "rounds": rounds,
            "local_steps": local_steps,
            "eval_every": rounds,
        },
        "algorithm": {"name": algorithm, "lr": 0.002},
        "runtime": {"quiet": True},
    }


def rows_needed(num_clients: int, train_per_client: int, test_fraction: float = 0.2) -> int:
    """Rows so that an IID split leaves every client ``train_per_client`` training rows."""
    return int(np.ceil(num_clients * (train_per_client + 2) / (1 - test_fraction))) + num_clients


# ---------------------------------------------------------------- timing


class RoundClock:
    """Driver callback: when the rounds started and when each round's callbacks finished.

    Added last, so its ``on_round_end`` runs after the results writer has
    flushed: ``end - start`` is the wall time of all rounds including the
    driver's own per-round work (Parquet writes), and excluding Ray start-up,
    actor start-up and model building (done before ``on_start``).
    """

    def __init__(self) -> None:
        self.created = time.perf_counter()
        self.start: float | None = None
        self.round_ends: list[float] = []

    def on_start(self, state: DriverState) -> None:
        self.start = time.perf_counter()

    def on_round_end(self, state: DriverState, report: RoundReport) -> None:
        self.round_ends.append(time.perf_counter())

    def on_end(self, state: DriverState, status: str) -> None:
        pass

    @property
    def setup_s(self) -> float:
        """From construction (just before ``run_experiment``) to the first round."""
        return self.start - self.created

    @property
    def rounds_s(self) -> float:
        return self.round_ends[-1] - self.start


def rows_for(variant: str, values: dict[str, float]) -> list[dict[str, Any]]:
    """``{"metric": value}`` -> result rows of one variant."""
    return [{"variant": variant, "metric": m, "value": float(v)} for m, v in values.items()]


# ---------------------------------------------------------------- output


def markdown_table(df: pd.DataFrame, columns: Sequence[str]) -> str:
    """A GitHub Markdown table of ``df[columns]`` (numbers to 4 significant digits)."""

    def fmt(v: Any) -> str:
        if isinstance(v, (float, np.floating)):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for _, row in df[list(columns)].iterrows():
        lines.append("| " + " | ".join(fmt(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def finish(name: str, rows: list[dict[str, Any]], out: Path, info: dict[str, Any]) -> pd.DataFrame:
    """Write ``out/bench.parquet`` (atomically) and print the result as Markdown."""
    df = pd.DataFrame([{"bench": name, **row, **info} for row in rows])
    df = df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]
    write_parquet(df, out / "bench.parquet")
    wide = df.pivot_table(index="metric", columns="variant", values="value", sort=False)
    wide = wide.reset_index()
    print(f"\n## bench {name}  ({info['cores']} cores, {info['memory_gb']} GB, {info['date']})\n")
    print(markdown_table(wide, list(wide.columns)))
    print(f"\nbench.parquet in {out}")
    return df
