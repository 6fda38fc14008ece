"""``pf2lora bench cluster``: the README's cluster recipe, run as written, on this machine.

What a user does on a fresh Ray cluster, with every node a separate process tree:

1. an environment with ``ray[default]`` (the job server and ``ray job submit``
   need it): ``.venv-cluster`` next to pyproject.toml (or ``PF2LORA_CLUSTER_VENV``),
   a virtual environment that sees this one's packages and adds ray[default];
2. ``pip wheel --no-deps -w WHEELS .`` (the README's command);
3. token authentication: ``RAY_AUTH_MODE=token`` and a token file
   (``RAY_AUTH_TOKEN_PATH``) for every node and for the submitter;
4. ``ray start --head`` (no CPUs, job server on 127.0.0.1) and two ``ray start
   --address`` worker nodes of 2 CPUs, each node with its own ports and ``--temp-dir``;
5. the README's ``ray job submit`` with a ``runtime_env`` that installs the
   wheel, writing to an S3 bucket (moto's server on 127.0.0.1; the nodes get
   the AWS_* variables from their environment, none go into the job);
6. ``pf2lora tune`` submitted the same way, two trials that each reserve a whole
   worker node: both trials' runs must be complete in the bucket, their Tune
   actors must have run on two different nodes (Ray's state API), and
   ``pf2lora report s3://...`` must write a tune report;
7. the run job again, and once round 3's results are in the bucket the
   processes of a worker node that holds one of its client actors are killed
   (SIGKILL to each): Ray restarts the actor on the other node and the backend
   replays from the checkpoint; the run must record the fault (a kill that
   lands after the last round would prove nothing).

Both run jobs' results must equal an in-process run of the same config (the
local backend); the bench raises if they do not. Rows: seconds per step.
Every node process is killed by pid (found by its environment marker), never
``ray stop``.
"""

from __future__ import annotations

import concurrent.futures
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
from pf2lora_ray.bench.venv import ensure_venv, repo_root
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_python() -> Path:
    """The ray[default] environment's interpreter, created on first use (a minute or two).

    It sees this environment's packages (torch and the rest) and adds only what
    ray[default] brings (aiohttp, grpcio, virtualenv, ...).
    """
    import ray

    venv = Path(os.environ.get(VENV_ENV, repo_root() / ".venv-cluster"))
    probe = "import aiohttp, virtualenv, ray.dashboard, torch"
    steps = [("ray[default]", [f"ray[default]=={ray.__version__}"])]
    return ensure_venv(venv, probe, steps, share_site=True)


class Node:
    """One ``ray start --block`` and every process it starts, marked in their environment.

    Ray's processes may leave the starter's process group, so a node is killed
    by the marker its processes inherit (``PF2LORA_BENCH_NODE``), pid by pid.
    """

    def __init__(self, args: list[str], env: dict[str, str], log: Path, marker: str) -> None:
        self.marker = f"PF2LORA_BENCH_NODE={marker}".encode()
        self.log_path = log
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
    """``ray start`` for the head (``head`` None) or a worker; its own ports and ``--temp-dir``.

    Nodes on one machine each need their own temp dir: two runtime-env agents building
    the job's pip environment in one folder fail ("dest dir ... exists"). No
    ``--node-ip-address``: ``ray start`` turns 127.0.0.1 into the routable address.
    """
    ray = [str(python), "-c", RAY_CLI, "start", "--block", "--disable-usage-stats"]
    per_node = [
        f"--temp-dir={temp}",
        f"--num-cpus={cpus}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
    ]
    if head is None:
        return [*ray, "--head", *per_node]
    return [*ray, f"--address={head}", *per_node]


def alive_nodes(python: Path, address: str, env: dict[str, str]) -> int:
    code = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR');"
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    try:  # a probe that outlasts its timeout (load average 20 on 2 cores) counts as none yet
        done = subprocess.run(
            [str(python), "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return 0
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else 0


def nodes_up(python: Path, address: str, env: dict[str, str], nodes: list[Node]) -> int:
    """Alive nodes at ``address``; raises at once if a started node's ``ray start`` exited."""
    for node in nodes:
        if node.proc.poll() is not None:
            tail = node.log_path.read_text()[-1500:]
            raise RuntimeError(f"bench cluster: {node.log_path.name}: ray start exited:\n{tail}")
    return alive_nodes(python, address, env)


def wait_for(what: str, check: Any, timeout: float, poll: float = 2.0) -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"bench cluster: {what} did not happen within {timeout:.0f} s")
        time.sleep(poll)
    return time.perf_counter() - start


def submit_args(
    python: Path,
    dashboard: str,
    wheel: Path,
    out: str,
    wait: bool,
    command: list[str] | None = None,
) -> list[str]:
    """The README's ``ray job submit`` (the synthetic job instead of SST-2, to stay short).

    ``command`` replaces ``run JOB`` (e.g. ``tune JOB --space ...``); the ``--set`` lines stay.
    """
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
        "--", "python", "-m", "pf2lora_ray.cli", *(command or ["run", JOB, "--quiet"]),
        *sets, "--out", out,
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


# Each trial reserves a whole worker node (driver 0.5 CPU + one 1.5-CPU actor = its 2 CPUs),
# so two trials running at once must be on the two worker nodes.
TUNE_SPACE = {
    "metric": "val.mse.mean",
    "mode": "min",
    "scheduler": "none",
    "fixed": {"resources.num_actors": 1, "resources.num_cpus_per_actor": 1.5},
    "space": {"adapter.r_personal": {"grid": [1, 2]}},
}


def actors(python: Path, dashboard: str, env: dict[str, str], cls: str, field: str) -> list:
    """``field`` (node_id, pid, ...) of every actor of class ``cls`` the cluster ran
    (``ALIVE`` ones only for ``pid``), from Ray's state API at the dashboard's URL
    (without an address it looks for "the" local Ray and finds several on this machine).
    """
    alive = ", ('state', '=', 'ALIVE')" if field == "pid" else ""
    code = (
        "import json; from ray.util.state import list_actors;"
        f"acts = list_actors(address={dashboard!r}, filters=[('class_name', '=', {cls!r}){alive}],"
        " limit=10000, detail=True, raise_on_missing_output=False);"
        f"print(json.dumps(sorted({{a.{field} for a in acts}})))"
    )
    done = subprocess.run(
        [str(python), "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench cluster: listing {cls} actors failed: {done.stderr[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def tune_across_nodes(
    python: Path, dashboard: str, wheel: Path, out: str, space: Path, env: dict
) -> dict[str, float]:
    """``ray job submit`` of a tune whose two trials run on the two worker nodes.

    Raises unless both trials' runs are complete in object storage, their
    trainables ran on two different nodes, and ``pf2lora report`` reads the URI.
    """
    from pf2lora_ray.cli import main

    space.write_text(json.dumps(TUNE_SPACE))  # YAML is a superset of JSON
    start = time.perf_counter()
    command = ["tune", JOB, "--quiet", "--space", str(space), "--samples", "1"]
    subprocess.run(
        submit_args(python, dashboard, wheel, out, wait=True, command=command),
        env=env, cwd=repo_root(), check=True, timeout=1800,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    # trials.parquet: one row per reported result (trial x evaluation round)
    trials = (location(out) / "trials.parquet").read_parquet()["trial_id"].unique()
    rounds = int(next(s for s in SETS if s.startswith("fed.rounds=")).split("=")[1])
    for trial_id in trials:
        metrics = (location(out) / "trials" / trial_id / "metrics.parquet").read_parquet()
        if metrics["round"].max() != rounds:
            raise AssertionError(f"{out}/trials/{trial_id}: not every round is in the bucket")
    nodes = actors(python, dashboard, env, "ImplicitFunc", "node_id")  # Tune's trainables
    if len(trials) != 2 or len(nodes) != 2:
        raise AssertionError(f"{len(trials)} trials on {len(nodes)} nodes, expected 2 on 2")
    if main(["report", out]) != 0 or "Tune report" not in (location(out) / "report.md").read_text():
        raise AssertionError(f"pf2lora report {out} did not write a tune report")
    return {"tune_job_s": seconds, "tune_trials": float(len(trials)), "tune_nodes": len(nodes)}


def run(quick: bool, out: Path) -> list[dict[str, Any]]:
    """Rows: seconds of each step; raises if a job fails or differs from in-process."""
    from pf2lora_ray.config import load_config
    from pf2lora_ray.experiment import run_experiment

    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the finally below stops the nodes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
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
    # The in-process reference runs in a thread while the nodes start (both mostly wait).
    pool = concurrent.futures.ThreadPoolExecutor(1)
    in_process = pool.submit(run_experiment, cfg, reference)

    # Ray's session folder holds AF_UNIX sockets (at most 107 bytes of path): keep it short.
    ray_temp = Path(tempfile.mkdtemp(prefix="pf2lora-ray-"))
    token = work / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    nodes: list[Node] = []
    with LocalS3() as s3:
        bucket = s3.bucket("cluster")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the job runs the wheel
        env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        env |= {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
        # Ray starts workers at nice +15 on top of the node's own niceness: on a shared,
        # loaded machine they then barely run (actors took minutes to import torch).
        env |= {"RAY_worker_niceness": "0"}
        try:
            gcs, dash = _free_port(), _free_port()
            head = f"127.0.0.1:{gcs}"
            start = time.perf_counter()
            head_args = node_args(python, ray_temp / "head", None, 0)
            head_args += [f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1"]
            head_args += [f"--dashboard-port={dash}", f"--ray-client-server-port={_free_port()}"]
            nodes.append(Node(head_args, env, work / "head.log", f"{work.name}-head"))
            for i in range(2):
                up = 1 + i
                wait_for("the nodes", lambda n=up: nodes_up(python, head, env, nodes) >= n, 600)
                worker = node_args(python, ray_temp / f"w{i}", head, 2)
                nodes.append(Node(worker, env, work / f"worker{i}.log", f"{work.name}-w{i}"))
            wait_for("two worker nodes", lambda: nodes_up(python, head, env, nodes) >= 3, 600)
            times["cluster_start_s"] = time.perf_counter() - start

            dashboard = f"http://127.0.0.1:{dash}"
            start = time.perf_counter()
            subprocess.run(
                submit_args(python, dashboard, wheel, f"{bucket}/run", wait=True),
                env=env, cwd=repo_root(), check=True, timeout=900,
            )  # fmt: skip
            times["job_s"] = time.perf_counter() - start
            in_process.result()
            equal_results(f"{bucket}/run", reference)
            space = work / "space.yaml"  # the head is this machine: the driver reads it there
            times |= tune_across_nodes(python, dashboard, wheel, f"{bucket}/tune", space, env)

            faulty = f"{bucket}/worker-killed"
            start = time.perf_counter()
            job = subprocess.Popen(
                submit_args(python, dashboard, wheel, faulty, wait=True),
                env=env, cwd=repo_root(),
            )  # fmt: skip
            # The node to kill is one that holds a client actor (SPREAD puts one on each).
            pids: list[int] = []

            def found() -> bool:
                pids[:] = actors(python, dashboard, env, "ClientActor", "pid")
                return bool(pids)

            wait_for("the second job's client actors", found, 600)
            victim = next(n for n in nodes[1:] if set(n.pids()) & set(pids))
            part = location(faulty) / "metrics.parquet" / f"part-{KILL_AFTER_ROUND:06d}.parquet"
            wait_for(f"round {KILL_AFTER_ROUND} of the second job", part.exists, 900, poll=0.2)
            victim.kill()
            if job.wait(timeout=900) != 0:
                raise RuntimeError(f"the job whose worker node was killed failed (see {work})")
            times["job_with_node_killed_s"] = time.perf_counter() - start
            equal_results(faulty, reference)
            faults = (location(faulty) / "system.parquet").read_parquet()["faults"]
            times["faults_recorded"] = float(sum(len(f) for f in faults))
            if not times["faults_recorded"]:
                raise AssertionError(f"{faulty}: no fault recorded, the kill missed the run")
        finally:
            for node in reversed(nodes):
                node.kill()
            shutil.rmtree(ray_temp, ignore_errors=True)  # sessions, sockets, pip environments
            pool.shutdown()
    return rows_for("cluster", times)
