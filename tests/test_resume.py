"""Driver crash + --resume, checkpoints, and refusing to overwrite a used folder."""

from __future__ import annotations

import json
import subprocess

import pandas as pd
import pytest

from pf2lora_ray.cli import main
from pf2lora_ray.faults import CRASH_EXIT_CODE
from tests.helpers import cli_process, synthetic_run_args

SETS = [
    "runtime.backend=local",
    "fed.rounds=4",
    "fed.eval_every=1",
    "synthetic.train_size=64",
    "fed.clients_per_round=6",
    "checkpoint.every=2",
]


def pf2lora(*args: str) -> subprocess.CompletedProcess:
    return cli_process(*args, timeout=300)


def run_args(out, *extra):
    return synthetic_run_args(out, *SETS, *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(run_args(out)) == 0
    return out


def test_crash_then_resume_equals_uninterrupted_run(tmp_path, reference):
    out = tmp_path / "run"
    crashed = pf2lora(*run_args(out, "faults.crash_driver_at_round=3"))
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["round"] == 3
    partial = pd.read_parquet(out / "metrics.parquet")
    assert partial["round"].max() == 3
    # Resume with the crash switched off (faults are not part of the config hash).
    assert main([*run_args(out), "--resume"]) == 0
    got = pd.read_parquet(out / "metrics.parquet")
    want = pd.read_parquet(reference / "metrics.parquet")
    assert not got.duplicated(["round", "client_id", "split", "metric"]).any()
    pd.testing.assert_frame_equal(
        got.reset_index(drop=True), want.reset_index(drop=True), rtol=1e-6
    )
    assert pd.read_parquet(out / "runs.parquet").loc[0, "status"] == "completed"


def contents(folder) -> dict[str, bytes]:
    """Every file under a Parquet dataset folder, by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_results_are_per_round_part_files(reference):
    parts = sorted(p.name for p in (reference / "metrics.parquet").iterdir())
    assert parts == [f"part-{r:06d}.parquet" for r in range(5)]  # 0: the schema, empty
    metrics = pd.read_parquet(reference / "metrics.parquet")
    assert str(metrics["client_id"].dtype) == "Int64" and metrics["round"].is_monotonic_increasing
    system = pd.read_parquet(reference / "system.parquet")
    assert list(system["round"]) == [1, 2, 3, 4]


def test_resume_deletes_the_rounds_after_the_checkpoint(tmp_path, reference):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    (out / "checkpoints" / "latest.json").write_text(
        json.dumps({"round": 2, "dir": "round_000002"})
    )
    assert main([*run_args(out), "--resume"]) == 0
    got = pd.read_parquet(out / "metrics.parquet")
    want = pd.read_parquet(reference / "metrics.parquet")
    assert not got.duplicated(["round", "client_id", "split", "metric"]).any()
    pd.testing.assert_frame_equal(got, want, rtol=1e-6)


def test_resume_turns_single_file_tables_of_older_versions_into_part_folders(tmp_path, reference):
    import shutil

    out = tmp_path / "old"
    shutil.copytree(reference, out)
    for name in ("metrics", "ranks", "system"):  # as versions before part folders wrote them
        table = pd.read_parquet(out / f"{name}.parquet")
        shutil.rmtree(out / f"{name}.parquet")
        table.to_parquet(out / f"{name}.parquet", index=False)
    latest = {"round": 2, "dir": "round_000002"}
    (out / "checkpoints" / "latest.json").write_text(json.dumps(latest))
    assert main([*run_args(out), "--resume"]) == 0
    assert (out / "metrics.parquet").is_dir()
    got = pd.read_parquet(out / "metrics.parquet")
    want = pd.read_parquet(reference / "metrics.parquet")
    pd.testing.assert_frame_equal(got, want, rtol=1e-6)


def test_new_run_refuses_a_used_folder(reference, capsys):
    before = contents(reference / "metrics.parquet")
    assert main(run_args(reference)) == 2
    assert "--resume" in capsys.readouterr().err
    assert contents(reference / "metrics.parquet") == before


def test_foreign_checkpoint_is_refused(reference, capsys):
    assert main([*run_args(reference, "adapter.r=3"), "--resume"]) == 2
    assert "different config" in capsys.readouterr().err


def test_truncated_checkpoint_is_refused(tmp_path, reference, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    shared = out / "checkpoints" / latest["dir"] / "shared.safetensors"
    shared.write_bytes(shared.read_bytes()[:20])
    before = contents(out / "metrics.parquet")
    assert main([*run_args(out), "--resume"]) == 2
    assert "truncated" in capsys.readouterr().err
    assert contents(out / "metrics.parquet") == before


def test_damaged_placement_is_refused(tmp_path, reference, capsys):
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    # Client 3's home is actor 7 of 2: no actor can take its state back.
    home = np.zeros(10, np.int64)
    home[3] = 7
    placement = {"home": home, "actors": np.array([2]), "measured_clients": np.zeros(0, np.int64)}
    placement["measured_s"] = np.zeros(0)
    save_file(placement, str(out / "checkpoints" / latest["dir"] / "placement.safetensors"))
    before = contents(out / "metrics.parquet")
    assert main([*run_args(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "placement.safetensors" in err and "not a placement of 10 clients" in err
    assert len(err.strip().splitlines()) == 1
    assert contents(out / "metrics.parquet") == before


def test_unwritable_output_folder_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(run_args(blocker / "sub")) == 2
    assert "cannot be written" in capsys.readouterr().err
