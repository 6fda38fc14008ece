"""``pf2lora bench cluster``: the README's cluster recipe, run as written, on this machine.

What a user does on a fresh Ray cluster, with every node a separate process tree:

1. an environment with ``ray[default]`` (the job server and ``ray job submit``
   need it): ``.venv-cluster`` next to pyproject.toml (or ``PF2LORA_CLUSTER_VENV``),
   a virtual environment that sees this one's packages and adds ray[default];
2. ``pip wheel --no-deps -w WHEELS .`` (the README's command);
3. token authentication: ``RAY_AUTH_MODE=token`` and a token file
   (``RAY_AUTH_TOKEN_PATH``) for every node and for the submitter;
4. ``ray start --head`` (no CPUs, job server on 127.0.0.1, its own ``--temp-dir``)
   and two ``ray start --address`` worker nodes of 2 CPUs, all on 127.0.0.1;
5. the README's ``ray job submit`` with a ``runtime_env`` that installs the
   wheel, writing to an S3 bucket (moto's server on 127.0.0.1; the nodes get
   the AWS_* variables from their environment, none go into the job);
6. the same job again, and once round 3's results are in the bucket the
   processes of the worker node holding actor work are killed (SIGKILL to its
   process group): Ray restarts the actors on the other node and the backend
   replays from the checkpoint.

Both jobs' results must equal an in-process run of the same config (the
local backend); the bench raises if they do not. Rows: seconds per step.
Every process is stopped by its process group at the end, never ``ray stop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pf2lora_ray.bench.common import rows_for
from pf2lora_ray.bench.s3 import LocalS3
from pf2lora_ray.storage import location

VENV_ENV = "PF2LORA_CLUSTER_VENV"
RAY_CLI = "from ray.scripts.scripts import main; main()"
JOB = "synthetic_rank.yaml"  # in jobs/, the README's --working-dir
SETS = [
    "fed.rounds=6",
    "fed.eval_every=1",
    "fed.clients_per_round=6",
    "synthetic.train_size=64",
    "synthetic.test_size=32",
    "checkpoint.every=2",
    "resources.num_actors=2",
    "resources.num_cpus_per_actor=1",
]
KILL_AFTER_ROUND = 3


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_python() -> Path:
    """The ray[default] environment's interpreter, created on first use (a minute or two).

    It is a virtual environment whose site-packages adds this environment's
    (a ``.pth`` line), so it shares torch and the rest and installs only what
    ray[default] adds (aiohttp, grpcio, virtualenv, ...).
    """
    import ray

    venv = Path(os.environ.get(VENV_ENV, repo_root() / ".venv-cluster"))
    python = venv / "bin" / "python"
    probe = "import aiohttp, virtualenv, ray.dashboard, torch"
    if python.exists() and subprocess.run([str(python), "-c", probe]).returncode == 0:
        return python
    print(f"creating the ray[default] environment in {venv} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    here = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "ray").is_dir())
    Path(site, "_pf2lora_base.pth").write_text(here + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"ray[default]=={ray.__version__}"], check=True
    )
    return python


class Node:
    """One ``ray start --block`` and every process it starts, marked in their environment.

    Ray's processes may leave the starter's process group, so a node is killed
    by the marker its processes inherit (``PF2LORA_BENCH_NODE``), pid by pid.
    """

    def __init__(self, args: list[str], env: dict[str, str], log: Path, marker: str) -> None:
        self.marker = f"PF2LORA_BENCH_NODE={marker}".encode()
        self.log = log.open("w")
        env = {**env, "PF2LORA_BENCH_NODE": marker}
        self.proc = subprocess.Popen(
            args, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def pids(self) -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.marker in environ:
                found.append(int(entry.name))
        return found

    def kill(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        self.log.close()


def node_args(python: Path, temp: Path, head: str | None, cpus: int) -> list[str]:
    """``ray start`` for the head (``head`` None) or a worker; distinct ports per node."""
    ray = [str(python), "-c", RAY_CLI, "start", "--block", "--disable-usage-stats"]
    per_node = [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]
    if head is None:
        return [*ray, "--head", f"--temp-dir={temp}", *per_node]
    return [*ray, f"--address={head}", *per_node]


def alive_nodes(python: Path, address: str, env: dict[str, str]) -> int:
    code = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR');"
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    done = subprocess.run(
        [str(python), "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else 0


def wait_for(what: str, check: Any, timeout: float) -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"bench cluster: {what} did not happen within {timeout:.0f} s")
        time.sleep(2)
    return time.perf_counter() - start


def submit_args(python: Path, dashboard: str, wheel: Path, out: str, wait: bool) -> list[str]:
    """The README's ``ray job submit`` (the synthetic job instead of SST-2, to stay short)."""
    # The package is already importable in this environment (same version), so pip
    # would skip the wheel; --force-reinstall --no-deps makes the job run the wheel.
    runtime_env = {
        "pip": {
            "packages": [str(wheel)],
            "pip_install_options": ["--force-reinstall", "--no-deps"],
        }
    }
    sets = [x for s in SETS for x in ("--set", s)]
    return [
        str(python), "-c", RAY_CLI, "job", "submit", f"--address={dashboard}",
        "--working-dir", "jobs", "--runtime-env-json", json.dumps(runtime_env),
        *([] if wait else ["--no-wait"]),
        "--", "python", "-m", "pf2lora_ray.cli", "run", JOB, "--quiet", *sets, "--out", out,
    ]  # fmt: skip


def equal_results(got: str, want: Path) -> None:
    """Raise unless every evaluation value of ``got`` equals ``want``'s (rel 1e-5)."""
    a = (location(got) / "metrics.parquet").read_parquet()
    b = (location(want) / "metrics.parquet").read_parquet()
    key = ["round", "client_id", "split", "metric"]
    a, b = a.sort_values(key, ignore_index=True), b.sort_values(key, ignore_index=True)
    if a[key].astype(str).values.tolist() != b[key].astype(str).values.tolist():
        raise AssertionError(f"{got}: other metric rows than the in-process run")
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-5, atol=1e-9)


def run(quick: bool, out: Path) -> list[dict[str, Any]]:
    """Rows: seconds of each step; raises if a job fails or differs from in-process."""
    from pf2lora_ray.config import load_config
    from pf2lora_ray.experiment import run_experiment

    times: dict[str, float] = {}
    start = time.perf_counter()
    python = cluster_python()
    times["environment_s"] = time.perf_counter() - start

    work = Path(tempfile.mkdtemp(prefix="pf2lora-cluster-", dir=out.resolve()))
    wheels = work / "wheels"
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), "."],
        cwd=repo_root(),
        check=True,
    )
    wheel = next(wheels.glob("pf2lora_ray-*.whl"))
    times["wheel_s"] = time.perf_counter() - start

    reference = work / "in-process"
    cfg = load_config(Path("jobs") / JOB, [*SETS, "runtime.backend=local", "runtime.quiet=true"])
    run_experiment(cfg, reference)

    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    nodes: list[Node] = []
    with LocalS3() as s3:
        bucket = s3.bucket("cluster")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the job runs the wheel
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        env |= {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        try:
            gcs, dash = _free_port(), _free_port()
            head = f"127.0.0.1:{gcs}"
            start = time.perf_counter()
            head_args = node_args(python, work / "ray", None, 0)
            head_args += [f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
            head_args += [f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}"]
            nodes.append(Node(head_args, env, work / "head.log", f"{work.name}-head"))
            for i in range(2):
                up = 1 + i
                wait_for("the nodes", lambda n=up: alive_nodes(python, head, env) >= n, 180)
                worker = node_args(python, work, head, 2)
                nodes.append(Node(worker, env, work / f"worker{i}.log", f"{work.name}-w{i}"))
            wait_for("two worker nodes", lambda: alive_nodes(python, head, env) >= 3, 180)
            times["cluster_start_s"] = time.perf_counter() - start

            dashboard = f"http://127.0.0.1:{dash}"
            start = time.perf_counter()
            subprocess.run(
                submit_args(python, dashboard, wheel, f"{bucket}/run", wait=True),
                env=env, cwd=repo_root(), check=True, timeout=900,
            )  # fmt: skip
            times["job_s"] = time.perf_counter() - start
            equal_results(f"{bucket}/run", reference)

            faulty = f"{bucket}/worker-killed"
            start = time.perf_counter()
            job = subprocess.Popen(
                submit_args(python, dashboard, wheel, faulty, wait=True),
                env=env, cwd=repo_root(),
            )  # fmt: skip
            part = location(faulty) / "metrics.parquet" / f"part-{KILL_AFTER_ROUND:06d}.parquet"
            wait_for(f"round {KILL_AFTER_ROUND} of the second job", part.exists, 900)
            nodes[1].kill()
            if job.wait(timeout=900) != 0:
                raise RuntimeError(f"the job whose worker node was killed failed (see {work})")
            times["job_with_node_killed_s"] = time.perf_counter() - start
            equal_results(faulty, reference)
            faults = (location(faulty) / "system.parquet").read_parquet()["faults"]
            times["faults_recorded"] = float(sum(len(f) for f in faults))
        finally:
            for node in reversed(nodes):
                node.kill()
    shutil.rmtree(work / "ray", ignore_errors=True)
    return rows_for("cluster", times)
