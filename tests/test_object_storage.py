"""Results, checkpoints, reports and exports in object storage (a real S3-protocol server).

The ``s3`` fixture (conftest.py) runs moto's S3 server on 127.0.0.1 and points
the AWS_* environment at it, as a user's shell would; the code under test finds
it only through that environment.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pf2lora_ray.cli import main
from pf2lora_ray.config import load_config
from pf2lora_ray.faults import CRASH_EXIT_CODE
from pf2lora_ray.storage import location
from tests.helpers import cli_process, synthetic_run_args

SETS = [
    "runtime.backend=local",
    "fed.rounds=4",
    "fed.eval_every=1",
    "synthetic.train_size=64",
    "synthetic.test_size=32",
    "fed.clients_per_round=6",
    "checkpoint.every=2",
]
TABLES = ("metrics", "ranks", "system")


def run_args(out: str | Path, *extra: str) -> list[str]:
    return synthetic_run_args(out, *SETS, *extra)


def pf2lora(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return cli_process(*args, timeout=timeout)


def table(where: str | Path, name: str) -> pd.DataFrame:
    frame = location(where) / f"{name}.parquet"
    return frame.read_parquet().drop(columns=["wall_s", "client_compute_s"], errors="ignore")


def assert_same_results(got: str | Path, want: str | Path) -> None:
    for name in TABLES:
        a, b = table(got, name), table(want, name)
        if name == "system":  # timings and memory differ run to run; the rest must not
            a, b = a[["run_id", "round", "clients"]], b[["run_id", "round", "clients"]]
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def all_keys(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    loc = location(uri)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    assert main(run_args(out)) == 0
    return out


def test_run_resume_report_and_export_on_s3(s3, local_run, tmp_path, capsys):
    run = f"{s3}/sst/run"
    assert main(run_args(run)) == 0
    assert_same_results(run, local_run)
    keys = all_keys(s3)
    assert f"{s3[5:]}/sst/run/metrics.parquet/part-000004.parquet" in keys
    assert f"{s3[5:]}/sst/run/checkpoints/latest.json" in keys
    assert not [k for k in keys if k.endswith(".tmp") or "/." in k], keys
    assert not (Path.cwd() / "s3:").exists()  # nothing went to a local folder named "s3:"

    # A driver killed after round 3, then --resume from the bucket: same results.
    crashed_run = f"{s3}/crashed"
    crashed = pf2lora(*run_args(crashed_run, "faults.crash_driver_at_round=3"))
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr
    latest = json.loads((location(crashed_run) / "checkpoints" / "latest.json").read_text())
    assert latest["round"] == 3
    assert table(crashed_run, "metrics")["round"].max() == 3
    assert main([*run_args(crashed_run), "--resume"]) == 0
    assert_same_results(crashed_run, local_run)
    runs = (location(crashed_run) / "runs.parquet").read_parquet()
    assert runs.loc[0, "status"] == "completed"

    # report and export read from the bucket (and write there).
    capsys.readouterr()
    assert main(["report", run]) == 0
    assert "Main metric" in (location(run) / "report.md").read_text()
    assert (location(run) / "rank_heatmap.png").read_bytes().startswith(b"\x89PNG")
    exported = f"{s3}/exports/client1"
    assert main(["export", run, "--client", "1", "--to", exported]) == 0
    assert main(["export", str(local_run), "--client", "1", "--to", str(tmp_path / "e")]) == 0
    remote = location(exported) / "adapter_model.safetensors"
    assert remote.read_bytes() == (tmp_path / "e" / "adapter_model.safetensors").read_bytes()
    info = json.loads((location(exported) / "pf2lora.json").read_text())
    assert info["run_dir"] == run and info["client"] == 1
    for line in capsys.readouterr().err.splitlines():
        assert "AWS_SECRET" not in line and "testing" not in line


def test_resume_of_a_folder_without_a_run_is_refused(s3, tmp_path, capsys):
    for out in (f"{s3}/empty", tmp_path / "empty"):
        assert main([*run_args(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert "holds no run" in err and len(err.strip().splitlines()) == 1, err
        assert not location(out).exists()


def test_unusable_locations_exit_2_before_writing(s3_server, tmp_path, capsys, monkeypatch):
    missing = "s3://no-such-bucket/run"
    assert main(run_args(missing)) == 2
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    assert main(["report", missing]) == 2
    assert main(["export", missing, "--to", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 2 and "Traceback" not in err
    # A file where a folder is expected, locally and for report.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(run_args(blocker)) == 2
    assert main(["report", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker} cannot be written: {blocker} is a file, not a folder" in err, err
    assert f"{blocker}: no such results folder" in err
    # An endpoint where nothing listens: one line, well within 30 s.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    start = time.perf_counter()
    assert main(run_args("s3://bucket/run")) == 2
    assert time.perf_counter() - start < 30
    err = capsys.readouterr().err
    assert err.startswith("error: --out s3://bucket/run") and len(err.splitlines()) == 1, err
    assert not blocker.with_name("run").exists()


def test_an_address_where_nothing_listens_fails_fast(tmp_path):
    out = tmp_path / "run"
    start = time.perf_counter()
    done = pf2lora(*run_args(out, "runtime.backend=ray"), "--address", "127.0.0.1:1", timeout=60)
    assert time.perf_counter() - start < 30
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0] and "no Ray cluster" in lines[0], lines
    assert not out.exists()


def test_damaged_results_and_checkpoints_are_refused_in_one_line(local_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(local_run, run)
    (run / "metrics.parquet" / "part-000002.parquet").write_bytes(b"not parquet")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "metrics.parquet" in err and len(err.splitlines()) == 1
    latest = run / "checkpoints" / "latest.json"
    latest.write_text("{broken")
    assert main(["export", str(run), "--to", str(tmp_path / "e")]) == 2
    assert main([*run_args(run), "--resume"]) == 2
    latest.write_text(json.dumps({"round": 4, "dir": "round_000004"}))
    (run / "checkpoints" / "round_000004" / "personal.safetensors").write_bytes(b"\0" * 7)
    assert main(["export", str(run), "--to", str(tmp_path / "e")]) == 2
    (run / "config.yaml").write_text("fed: [unclosed")
    assert main(["export", str(run), "--to", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("error: ") == 4 and len(err.strip().splitlines()) == 4, err
    assert "malformed" in err and "truncated or unreadable" in err


@pytest.mark.ray
def test_tune_writes_every_trial_to_s3_and_report_reads_it(s3, tmp_path, capsys):
    import ray

    from pf2lora_ray.tune import run_tune

    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "metric": "test.mse.mean",
                "mode": "min",
                "scheduler": "none",
                "fixed": {"resources.num_cpus_per_actor": 0.5},
                "space": {"adapter.r_personal": {"grid": [1, 2]}},
            }
        )
    )
    cfg = load_config(
        "jobs/synthetic_rank.yaml",
        ["fed.rounds=2", "synthetic.train_size=64", "synthetic.test_size=32", "runtime.quiet=true"],
    )
    out = f"{s3}/tune"
    ray.init(num_cpus=2, include_dashboard=False)  # after the fixture set AWS_* for its workers
    try:
        best = run_tune(cfg, space, out, samples=1)
    finally:
        ray.shutdown()
    assert str(best) == f"{out}/best.yaml"
    trials = (location(out) / "trials.parquet").read_parquet()
    assert sorted(trials["config/adapter.r_personal"]) == [1, 2]
    for trial_id in trials["trial_id"]:
        metrics = table(f"{out}/trials/{trial_id}", "metrics")
        assert metrics["round"].max() == 2
    assert (location(out) / "tune" / "tuner.pkl").is_file()  # Ray's own state, same bucket
    assert main(["report", out]) == 0
    assert "Tune report" in (location(out) / "report.md").read_text()
