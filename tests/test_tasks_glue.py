"""GLUE tasks: loading every offline task folder, errors on bad files, tiny end-to-end runs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pf2lora_ray.cli import main
from pf2lora_ray.config import ConfigError, load_config
from pf2lora_ray.experiment import run_experiment
from pf2lora_ray.tasks import task_for
from pf2lora_ray.tasks.base import DataError
from pf2lora_ray.tasks.glue import GLUE_TASKS, GlueTask


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run many small ops; with 2 threads on a shared 2-core machine the
    thread hand-offs cost more than the ops (measured ~20x slower), so use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PF2LORA_DATA", REPO.parent / "shared" / "data"))
GLUE = DATA / "glue"
FOLDERS = {
    "CoLA": "cola",
    "SST-2": "sst2",
    "MRPC": "mrpc",
    "QQP": "qqp",
    "STS-B": "stsb",
    "MNLI": "mnli",
    "QNLI": "qnli",
    "RTE": "rte",
    "WNLI": "wnli",
}
SPLIT_FILES = sorted(
    (folder, f.stem)
    for folder in FOLDERS
    if (GLUE / folder).is_dir()
    for f in (GLUE / folder).glob("*.tsv")
)


def cfg_for(data: dict, **sections) -> object:
    """A tiny-bert config with data overrides (dotted keys) on the local backend."""
    base = {
        "model.name": "tiny-bert",
        "data.name": "glue",
        "runtime.backend": "local",
        "runtime.quiet": True,
        "fed.num_clients": 2,
        "fed.clients_per_round": 2,
    }
    base.update({f"data.{k}": v for k, v in data.items()})
    base.update(sections)
    return load_config(None, extra=base)


def data_rows(file: Path, header: bool) -> int:
    with open(file, encoding="utf-8") as f:
        return sum(1 for _ in f) - int(header)


# ---------------------------------------------------------------- the offline GLUE folders


@pytest.mark.skipif(not SPLIT_FILES, reason=f"no GLUE data under {GLUE}")
@pytest.mark.parametrize(("folder", "split"), SPLIT_FILES)
def test_every_glue_split_file_loads_with_its_task_columns_and_labels(folder, split):
    name = FOLDERS[folder]
    task = GlueTask(cfg_for({"task": name, "path": str(GLUE / folder), "split": split}))
    table = task.table()
    spec = GLUE_TASKS[name]
    assert len(table.targets) == data_rows(task.file, header=spec.headerless is None)
    assert len(table.texts) == len(spec.text)
    assert all(len(t) == len(table.targets) for t in table.texts)
    if spec.label_names is None:
        assert table.targets.min() >= 0 and table.targets.max() <= 5
    else:
        assert set(np.unique(table.targets)) == set(range(spec.num_labels))


@pytest.mark.skipif(not (GLUE / "CoLA").is_dir(), reason="no CoLA folder")
def test_cola_headerless_rows_keep_their_quotes_and_labels():
    task = GlueTask(cfg_for({"task": "cola", "path": str(GLUE / "CoLA")}))
    table = task.table()
    assert (
        table.texts[0][0]
        == "Our friends won't buy this analysis, let alone the next one we propose."
    )
    assert table.targets[:4].tolist() == [1, 1, 1, 1]
    # Rows with quote characters are read whole (QUOTE_NONE), never merged.
    assert any('"' in s for s in table.texts[0])


@pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason="no SST-2 folder")
def test_label_sorted_clients_get_skewed_disjoint_subsampled_splits():
    cfg = cfg_for(
        {
            "task": "sst2",
            "path": str(GLUE / "SST-2"),
            "split": "dev",
            "partition": "label_sort",
            "similarity": 0.0,
            "max_train_per_client": 50,
            "max_test_per_client": 20,
        },
        **{"fed.num_clients": 4, "fed.clients_per_round": 4},
    )
    task = GlueTask(cfg)
    data = task.client_data([0, 3])
    assert len(data[0].train) == 50 and len(data[0].test) == 20
    # Pure label sort: the first client holds negatives only, the last positives only.
    assert set(data[0].train_labels) == {0} and set(data[3].train_labels) == {1}
    again = GlueTask(cfg).client_data([3])[3]
    assert [r["input_ids"] for r in again.test.rows] == [r["input_ids"] for r in data[3].test.rows]


# ---------------------------------------------------------------- errors on tiny files


def write_tsv(path: Path, header: str, rows: list[str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "train.tsv").write_text("\n".join([header, *rows]) + "\n")
    return path


def test_missing_columns_name_the_expected_ones_and_the_file(tmp_path):
    folder = write_tsv(tmp_path / "rte", "index\ttext\tlabel", ["0\ta\tentailment"])
    task = GlueTask(cfg_for({"task": "rte", "path": str(folder)}))
    with pytest.raises(
        DataError, match=r"train\.tsv: no text field 1 column; expected one of \['sentence1'\]"
    ):
        task.table()


def test_label_outside_the_task_set_names_the_row(tmp_path):
    folder = write_tsv(
        tmp_path / "rte",
        "index\tsentence1\tsentence2\tlabel",
        ["0\ta\tb\tentailment", "1\tc\td\tmaybe"],
    )
    task = GlueTask(cfg_for({"task": "rte", "path": str(folder)}))
    with pytest.raises(DataError, match=r"row 1: label 'maybe' is not a rte label"):
        task.table()


def test_stsb_score_outside_zero_to_five_names_the_row(tmp_path):
    folder = write_tsv(tmp_path / "stsb", "sentence1\tsentence2\tscore", ["a\tb\t2.5", "c\td\t7"])
    with pytest.raises(DataError, match="row 1: score"):
        GlueTask(cfg_for({"task": "stsb", "path": str(folder)})).table()


def test_missing_path_and_split_and_unknown_task(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        GlueTask(cfg_for({"task": "sst2", "path": str(tmp_path / "nowhere")}))
    with pytest.raises(DataError, match=r"no dev file; expected one of \['dev.tsv'"):
        GlueTask(cfg_for({"task": "sst2", "path": str(tmp_path), "split": "dev"}))
    with pytest.raises(ConfigError, match="data.task: 'sst3' is not a GLUE task"):
        task_for(cfg_for({"task": "sst3", "path": str(tmp_path)}))


def test_bad_label_exits_2_through_the_cli(tmp_path, capsys):
    folder = write_tsv(tmp_path / "sst", "sentence\tlabel", ["fine\t1", "bad\t2"])
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {{name: tiny-bert}}\ndata: {{name: glue, task: sst2, path: {folder}}}\n"
        "fed: {num_clients: 1, clients_per_round: 1, rounds: 1}\nruntime: {backend: local}\n"
    )
    assert main(["run", str(job), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "row 1: label 2 is not a sst2 label" in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.parquet").exists()


def test_csv_json_parquet_files_with_renamed_columns(tmp_path):
    df = pd.DataFrame({"review": ["good film", "bad film", "so good", "so bad"], "y": [1, 0, 1, 0]})
    df.to_csv(tmp_path / "train.csv", index=False)
    df.to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    df.to_parquet(tmp_path / "train.parquet")
    for name, file in [("csv", "train.csv"), ("json", "train.jsonl"), ("parquet", "train.parquet")]:
        cfg = cfg_for(
            {
                "name": name,
                "task": "sst2",
                "path": str(tmp_path / file),
                "text_columns": ["review"],
                "label_column": "y",
            }
        )
        table = GlueTask(cfg).table()
        assert table.texts[0] == df.review.tolist() and table.targets.tolist() == [1, 0, 1, 0]


# ---------------------------------------------------------------- tiny end-to-end runs

WORDS = ["film", "plot", "actor", "scene", "story", "music", "ending", "cast"]


def write_sentiment(folder: Path, n: int, seed: int = 0) -> Path:
    """SST-2-format data where the label is whether the sentence says 'good'."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(WORDS, size=3)) + ["good" if label else "bad"]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)}\t{label}")
    return write_tsv(folder, "sentence\tlabel", rows)


def write_similarity(folder: Path, n: int, seed: int = 0) -> Path:
    """STS-B-format pairs scored by word overlap (0-5)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a = list(rng.choice(WORDS, size=5))
        keep = int(rng.integers(6))
        b = a[:keep] + list(rng.choice(["x", "y", "z"], size=5 - keep))
        rows.append(f"{i}\t{' '.join(a)}\t{' '.join(b)}\t{keep:.1f}")
    return write_tsv(folder, "index\tsentence1\tsentence2\tscore", rows)


def run_metrics(cfg, out: Path) -> pd.DataFrame:
    run_experiment(cfg, out)
    return pd.read_parquet(out / "metrics.parquet")


def test_tiny_bert_classification_run_learns_and_reports_majority_baseline(tmp_path):
    folder = write_sentiment(tmp_path / "sst", 160)
    cfg = cfg_for(
        {
            "task": "sst2",
            "path": str(folder),
            "partition": "dirichlet",
            "alpha": 1.0,
            "batch_size": 16,
        },
        **{"fed.rounds": 4, "fed.local_steps": 5, "fed.eval_every": 1, "algorithm.lr": 0.02},
    )
    df = run_metrics(cfg, tmp_path / "out")
    per_client = df[df.client_id.notna() & (df.split == "test")]
    # The task reports these; an algorithm may add its own diagnostics beside them.
    assert {"accuracy", "loss", "majority_accuracy"} <= set(per_client.metric)
    loss = df[(df.metric == "train_loss.mean")].sort_values("round").value.to_numpy()
    assert loss[-1] < loss[0]
    assert np.isfinite(per_client.value).all()


def test_tiny_gpt2_regression_run_reports_correlations(tmp_path):
    folder = write_similarity(tmp_path / "stsb", 80)
    cfg = cfg_for(
        {"task": "stsb", "path": str(folder), "partition": "label_sort"},
        **{"model.name": "tiny-gpt2", "fed.rounds": 2, "fed.local_steps": 2, "fed.eval_every": 2},
    )
    df = run_metrics(cfg, tmp_path / "out")
    last = df[(df["round"] == 2) & df.client_id.notna()]
    test = last[last.split == "test"].groupby("metric").value
    assert {"loss", "pearson", "spearman"} <= set(test.groups)
    assert test.get_group("pearson").between(-1, 1).all()
    assert test.get_group("spearman").between(-1, 1).all()
    # STS-B scores lie in [0, 5]: a mean squared error above 25 is worse than any constant.
    assert test.get_group("loss").between(0, 25).all()


def test_regression_loss_is_mean_squared_error_of_the_first_output(tmp_path):
    folder = write_similarity(tmp_path / "stsb", 20)
    task = GlueTask(cfg_for({"task": "stsb", "path": str(folder)}))
    torch.manual_seed(0)
    model = task.build_model()
    data = task.client_data([0])[0]
    batch = task.batch(data.train, np.arange(4))
    params = dict(model.named_parameters())
    pred = model(**{k: v for k, v in batch.items() if k != "target"}).logits[:, 0]
    expected = torch.mean((pred - batch["target"].float()) ** 2)
    assert torch.allclose(task.loss(model, params, batch), expected)


@pytest.mark.ray
@pytest.mark.parametrize(("task", "write"), [("sst2", write_sentiment), ("stsb", write_similarity)])
def test_tiny_runs_on_ray_match_local(tmp_path, task, write):
    folder = write(tmp_path / task, 60)
    sections = {"fed.rounds": 2, "fed.local_steps": 2, "fed.eval_every": 2}
    data = {"task": task, "path": str(folder)}
    local = run_metrics(cfg_for(data, **sections), tmp_path / "a")
    ray = run_metrics(cfg_for(data, **{**sections, "runtime.backend": "ray"}), tmp_path / "b")
    key = ["round", "client_id", "split", "metric"]
    merged = local.merge(ray, on=key, suffixes=("_local", "_ray"))
    assert len(merged) == len(local) > 0
    np.testing.assert_allclose(merged.value_local, merged.value_ray, rtol=1e-4, atol=1e-5)


def test_truncation_is_counted_named_and_recorded(tmp_path, capsys):
    """Pairs cut by data.max_length: one line naming the share and the length for 95%."""
    folder = write_similarity(tmp_path / "stsb", 60)  # pairs of 5 + 5 words
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "tiny-bert"},
                "data": {"name": "glue", "task": "stsb", "path": str(folder), "max_length": 8},
                "fed": {"num_clients": 2, "clients_per_round": 2, "rounds": 1, "local_steps": 1},
                "runtime": {"backend": "local"},
            }
        )
    )
    assert main(["run", str(job), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if "data.max_length=8" in x]
    assert len(lines) == 1
    assert "100.0% of train" in lines[0] and "of val" in lines[0] and "of test" in lines[0]
    runs = pd.read_parquet(tmp_path / "out" / "runs.parquet")
    assert runs["data_check.truncated.train"].iloc[0] == 1.0
    keep = int(runs["data_check.length_p95"].iloc[0])
    assert keep > 8 and f"--set data.max_length={keep}" in lines[0]
    # Long enough: nothing is cut, nothing is said, and the share is recorded as 0.
    main(["run", str(job), "--out", str(tmp_path / "out2"), "--quiet", "--set",
          f"data.max_length={keep + 8}"])
    assert "data.max_length" not in capsys.readouterr().err
    runs = pd.read_parquet(tmp_path / "out2" / "runs.parquet")
    assert runs["data_check.truncated.test"].iloc[0] == 0.0
