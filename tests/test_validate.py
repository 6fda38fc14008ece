"""Bad input is refused on the driver before --out exists: exit 2, one line, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pf2lora_ray.cli import main
from pf2lora_ray.config import ConfigError, read_yaml
from pf2lora_ray.tasks.base import DataError
from pf2lora_ray.validate import one_line, unwrap, validate_job

ROOT = Path(__file__).resolve().parents[1]


def write_sst2(folder: Path, rows: int, extra: str = "") -> Path:
    folder.mkdir(parents=True)
    lines = ["sentence\tlabel"] + [f"film number {i} was fine\t{i % 2}" for i in range(rows)]
    (folder / "train.tsv").write_text("\n".join(lines) + "\n" + extra)
    return folder


@pytest.fixture
def job(tmp_path) -> Path:
    """A tiny-BERT SST-2 job on 40 rows, 4 clients, in-process backend."""
    data = write_sst2(tmp_path / "sst2", 40)
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "tiny-bert"},
                "data": {"name": "glue", "task": "sst2", "path": str(data)},
                "fed": {"num_clients": 4, "clients_per_round": 2, "rounds": 1, "local_steps": 1},
                "runtime": {"backend": "local", "quiet": True},
            }
        )
    )
    return job


def _bad_labels(tmp: Path) -> str:
    return str(write_sst2(tmp / "badlabels", 40, "an odd row\t7\n"))


def _garbage(tmp: Path) -> str:
    (tmp / "x.parquet").write_bytes(b"\x00\x01 not parquet \xff")
    return str(tmp / "x.parquet")


def _bad_json(tmp: Path) -> str:
    (tmp / "j").mkdir()
    (tmp / "j" / "train.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": ')
    return str(tmp / "j")


CASES = {
    "missing data.path": (lambda t: ["data.path=" + str(t / "nope")], "data.path"),
    "unreadable file": (lambda t: ["data.path=" + _garbage(t)], "x.parquet"),
    "malformed json": (lambda t: ["data.path=" + _bad_json(t)], "train.jsonl"),
    "label outside the set": (lambda t: ["data.path=" + _bad_labels(t)], "row 40: label 7"),
    "too few rows": (lambda t: ["fed.num_clients=30"], "fed.num_clients=30"),
    "bad data.name": (lambda t: ["data.name=glu"], "data.name"),
    "bad data.task": (lambda t: ["data.task=sst3"], "data.task"),
    "bad algorithm.name": (lambda t: ["algorithm.name=fedsgd"], "algorithm.name"),
    "webnlg without data.path": (lambda t: ["data.name=webnlg", "data.path=null"], "data.path"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_exits_2_with_one_line_and_no_folder(job, tmp_path, capsys, case):
    sets, needle = CASES[case]
    out = tmp_path / "out"
    argv = ["run", str(job), "--out", str(out)]
    for item in sets(tmp_path):
        argv += ["--set", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_a_bad_sweep_variant_stops_the_job_before_the_first_variant_runs(job, tmp_path, capsys):
    data = read_yaml(job)
    data["sweep"] = [
        {"label": "good", "algorithm.name": "homlora"},
        {"label": "typo", "algorithm.name": "homlora", "data.task": "sst3"},
    ]
    job.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["run", str(job), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sweep variant 'typo': data.task" in err and err.count("\n") == 1
    assert not out.exists()


def test_the_ray_backend_refuses_bad_data_before_ray_starts(job, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pf2lora_ray.cli", "run", str(job), "--out", str(out),
         "--set", "runtime.backend=ray", "--set", f"data.path={tmp_path / 'nope'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: data.path:") and proc.stderr.count("\n") == 1
    assert not out.exists()


LATE = """
import sys
import pf2lora_ray.validate as validate
validate.validate_run = lambda *args, **kwargs: None  # let bad data reach the actors
from pf2lora_ray.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.ray
def test_an_error_raised_in_a_ray_actor_is_unwrapped_to_one_line(job, tmp_path):
    """Driver-side checks switched off: the actor's DataError comes back through Ray."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", LATE, "run", str(job), "--out", str(out),
         "--set", "runtime.backend=ray", "--set", "resources.num_actors=1",
         "--set", f"data.path={tmp_path / 'nope'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert lines == [f"error: data.path: {tmp_path / 'nope'} does not exist; "
                     "point it at a data folder or file"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_unwrap_finds_the_cause_and_parses_a_remote_traceback():
    class Wrapper(RuntimeError):  # like ray.exceptions.RayTaskError
        def __init__(self, cause):
            super().__init__("task failed")
            self.cause = cause

    bad = DataError("data.path: x does not exist")
    assert unwrap(Wrapper(bad)) is bad
    died = RuntimeError(  # like ray.exceptions.ActorDiedError: only the message survives
        "The actor died because of an error raised in its creation task, ray::Host.__init__()\n"
        "Traceback (most recent call last):\n  File ...\n"
        "pf2lora_ray.tasks.base.DataError: data.path: x does not exist; point it at a folder"
    )
    found = unwrap(died)
    assert isinstance(found, DataError)
    assert str(found) == "data.path: x does not exist; point it at a folder"
    assert unwrap(RuntimeError("something else")) is None
    assert one_line(ConfigError("a:\n   b\n c")) == "a: b c"


def test_seeds_give_each_variant_once_per_seed():
    data = {"fed": {"rounds": 1}, "seeds": [0, 3],
            "sweep": [{"label": "a", "algorithm.name": "homlora"}, {"label": "b"}]}
    runs = validate_job(data)
    assert [(v.folder, v.label, cfg.seed) for v, cfg, _ in runs] == [
        ("a-s0", "a", 0), ("a-s3", "a", 3), ("b-s0", "b", 0), ("b-s3", "b", 3)
    ]
    alone = validate_job({"seeds": [1, 2]})
    assert [(v.folder, v.label, cfg.seed) for v, cfg, _ in alone] == [("s1", "", 1), ("s2", "", 2)]


@pytest.mark.parametrize(
    ("data", "sets", "needle"),
    [
        ({"seeds": []}, [], "seeds"),
        ({"seeds": [0, 0]}, [], "seeds"),
        ({"seeds": [-1]}, [], "seeds"),
        ({"seeds": "0,1"}, [], "seeds"),
        ({"seeds": [0, 1], "sweep": {"seed": [0, 1]}}, [], "seeds"),
        ({"seeds": [0, 1]}, ["seed=4"], "seed"),
    ],
)
def test_bad_seeds_lists_are_refused(data, sets, needle):
    with pytest.raises(ConfigError, match=needle):
        validate_job(data, sets)


SHIPPED_JOBS = sorted(
    p for p in (ROOT / "jobs").rglob("*.yaml") if p.parent.name != "spaces"
)


@pytest.mark.parametrize("path", SHIPPED_JOBS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_job_builds_every_run(path):
    """Every job under jobs/ (not the search spaces) builds a config per run: no typo in a
    key or value survives in a file a user is told to run. Data and models are not loaded."""
    from pf2lora_ray.config import build_config, expand_job

    variants = expand_job(read_yaml(path))
    configs = [build_config(variant.overrides) for variant in variants]
    assert configs, f"{path} expands to no run"
    assert len({variant.folder for variant in variants}) == len(configs), "two runs share a folder"
