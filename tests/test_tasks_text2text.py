"""text2text: any CSV/TSV/JSON/Parquet data-to-text table, on a tiny random LM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pf2lora_ray.cli import main
from pf2lora_ray.config import ConfigError, load_config
from pf2lora_ray.experiment import run_experiment
from pf2lora_ray.tasks.base import DataError
from pf2lora_ray.tasks.text2text import Text2TextTask
from pf2lora_ray.tasks.webnlg import WebNLGTask, linearise
from pf2lora_ray.validate import validate_run


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine run faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GROUPS = ("Airport", "Food", "City")


def table(per_group: int = 6) -> pd.DataFrame:
    """Rows (source, text, domain): every source twice, with two different texts."""
    rows = []
    for g, group in enumerate(GROUPS):
        for i in range(per_group):
            source = f"{group} {i} : code : {g}{i}"
            for text in (f"{group} {i} has code {g}{i}.", f"The code of {group} {i} is {g}{i}."):
                rows.append({"source": source, "text": text, "domain": group})
    return pd.DataFrame(rows)


def write(df: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif path.suffix == ".jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path, index=False)
    return path


def cfg_for(path: Path, **extra):
    base = {
        "model.name": "tiny-llama",
        "data.name": "text2text",
        "data.path": str(path),
        "data.source_column": "source",
        "data.target_column": "text",
        "data.group_column": "domain",
        "data.partition": "task",
        "data.max_length": 96,
        "data.max_new_tokens": 12,
        "data.batch_size": 8,
        "fed.num_clients": 3,
        "fed.clients_per_round": 3,
        "runtime.backend": "local",
        "runtime.quiet": True,
    }
    return load_config(None, extra={**base, **extra})


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_every_format_groups_rows_by_source_into_entries(tmp_path, suffix):
    task = Text2TextTask(cfg_for(write(table(), tmp_path / f"train{suffix}")))
    entries = task.entries()
    assert len(entries) == 18  # 3 groups x 6 sources, each with its 2 texts
    first = entries[0]
    assert first.source == "Airport 0 : code : 00" and first.group == "Airport"
    assert first.references == ("Airport 0 has code 00.", "The code of Airport 0 is 00.")


def test_a_folder_is_read_by_split_and_the_same_source_in_two_groups_is_two_entries(tmp_path):
    df = table(2)
    df.loc[df.domain == "Food", "source"] = "shared source"
    df.loc[df.domain == "City", "source"] = "shared source"
    write(df, tmp_path / "dev.csv")
    task = Text2TextTask(cfg_for(tmp_path, **{"data.split": "dev"}))
    shared = [e for e in task.entries() if e.source == "shared source"]
    assert sorted(e.group for e in shared) == ["City", "Food"]
    assert all(len(e.references) == 4 for e in shared)


def test_task_partition_gives_each_client_one_group_scored_on_all_references(tmp_path):
    task = Text2TextTask(cfg_for(write(table(), tmp_path / "train.csv")))
    data = task.client_data([0, 1, 2])
    tok = task.tokenizer
    seen = set()
    for d in data.values():
        prompts = [tok.decode(p) for p in d.test.extra["prompt"]]
        groups = {g for g in GROUPS for p in prompts if p.startswith(g)}
        assert len(groups) == 1 and all(p.endswith("\nText:") for p in prompts)
        seen |= groups
        assert all(len(refs) == 2 for refs in d.test.extra["references"])
        assert len(d.train) % 2 == 0 and len(d.train) > 0  # both texts of a train source
    assert seen == set(GROUPS)


def test_iid_partition_needs_no_group_column(tmp_path):
    path = write(table().drop(columns="domain"), tmp_path / "train.parquet")
    task = Text2TextTask(cfg_for(path, **{"data.partition": "iid", "data.group_column": None}))
    task.check_data()
    assert {e.group for e in task.entries()} == {""}


def test_webnlg_and_a_text2text_table_of_the_same_entries_give_the_same_examples(tmp_path):
    entries, rows = [], []
    for c, category in enumerate(GROUPS):
        for i in range(5):
            triple = (f"{category}_{i}", "code", f'"{c}{i}"')
            texts = [f"{category} {i} has code {c}{i}.", f"Code {c}{i}."]
            entries.append({str(len(entries) + 1): {
                "category": category,
                "modifiedtripleset": [dict(zip(("subject", "property", "object"), triple,
                                               strict=True))],
                "lexicalisations": [{"lex": t} for t in texts]}})
            rows += [{"source": linearise([triple]), "text": t, "domain": category}
                     for t in texts]
    (tmp_path / "webnlg").mkdir()
    (tmp_path / "webnlg" / "train.json").write_text(json.dumps({"entries": entries}))
    webnlg = WebNLGTask(cfg_for(tmp_path / "webnlg", **{"data.name": "webnlg"}))
    text2text = Text2TextTask(cfg_for(write(pd.DataFrame(rows), tmp_path / "t.csv"),
                                      **{"data.prompt": "Triples: {source}\nText:"}))
    a, b = webnlg.client_data([0, 1, 2]), text2text.client_data([0, 1, 2])
    for k in range(3):
        assert a[k].train.rows == b[k].train.rows and a[k].test.rows == b[k].test.rows
        assert a[k].test.extra == b[k].test.extra


def test_the_data_check_counts_per_split_the_examples_max_length_cuts(tmp_path, capsys):
    """Its shares are those of the rows (and decoded prompts) that data.max_length changes."""
    df = table(10)
    df["text"] = [t + " more" * (i % 12) for i, t in enumerate(df.text)]  # texts of 22-80 bytes
    path = write(df, tmp_path / "train.csv")
    whole = Text2TextTask(cfg_for(path, **{"data.max_length": 4096})).client_data([0, 1, 2])
    for limit, prompts_cut in ((40, True), (64, False)):  # prompts are 27-28 bytes
        task = Text2TextTask(cfg_for(path, **{"data.max_length": limit}))
        report, cut = task.check_data(), task.client_data([0, 1, 2])
        for split in ("train", "val", "test"):
            pairs = [(a, b) for k in range(3) for a, b in zip(
                getattr(cut[k], split).rows, getattr(whole[k], split).rows, strict=True)]
            assert len(pairs) > 0
            changed = np.mean([a != b for a, b in pairs])
            assert report[f"truncated.{split}"] == pytest.approx(changed)
            if prompts_cut:  # every row loses prompt tokens
                assert changed == 1
            elif split == "train":  # some texts fit, some do not
                assert 0 < changed < 1
            if split != "train":
                prompts = [(a, b) for k in range(3) for a, b in zip(
                    getattr(cut[k], split).extra["prompt"],
                    getattr(whole[k], split).extra["prompt"], strict=True)]
                assert report[f"prompt_cut.{split}"] == float(prompts_cut)
                assert np.mean([a != b for a, b in prompts]) == float(prompts_cut)
        # One line before a run when a split loses more than 5%; none at the 95% length.
        validate_run(task.cfg)
        lines = capsys.readouterr().err.splitlines()
        keep = int(report["length_p95"])
        assert len(lines) == 1 and f"data.max_length={limit} cuts" in lines[0]
        assert f"--set data.max_length={keep}" in lines[0] and keep > limit
    validate_run(cfg_for(path, **{"data.max_length": 4096}))
    assert capsys.readouterr().err == ""


def test_without_validation_entries_the_data_check_reports_no_val_share(tmp_path, capsys):
    df = table(10)
    path = write(df, tmp_path / "train.csv")
    cfg = cfg_for(path, **{"data.max_length": 40, "data.val_fraction": 0.0})
    report = Text2TextTask(cfg).check_data()
    assert "truncated.val" not in report and "prompt_cut.val" not in report
    assert report["truncated.test"] > 0.05  # so the line is printed
    validate_run(cfg)
    line = capsys.readouterr().err
    assert "of test" in line and "of val" not in line


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        ({"data.source_column": None}, ConfigError, "data.source_column"),
        ({"data.group_column": None}, ConfigError, "data.group_column: data.partition=task"),
        ({"data.target_column": "txt"}, DataError, "no column 'txt'.*'text'"),
        ({"data.prompt": "Input:"}, ConfigError, "data.prompt: must contain {source}"),
    ],
)
def test_bad_columns_and_prompt_name_the_key(tmp_path, extra, error, match):
    path = write(table(), tmp_path / "train.csv")
    with pytest.raises(error, match=match):
        Text2TextTask(cfg_for(path, **extra)).check_data()


def test_an_empty_cell_names_its_row(tmp_path):
    df = table()
    df.loc[3, "text"] = ""
    with pytest.raises(DataError, match="row 4 has no value in column 'text'"):
        Text2TextTask(cfg_for(write(df, tmp_path / "train.csv"))).entries()


def test_cli_refuses_a_bad_column_before_writing_anything(tmp_path, capsys):
    path = write(table(), tmp_path / "train.csv")
    job = tmp_path / "job.yaml"
    job.write_text(
        "model: {name: tiny-llama}\n"
        f"data: {{name: text2text, path: {path}, source_column: src, target_column: text}}\n"
        "fed: {num_clients: 2, clients_per_round: 2, rounds: 1}\nruntime: {backend: local}\n"
    )
    assert main(["run", str(job), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'src'" in err[0]
    assert not (tmp_path / "out").exists()


def test_tiny_llama_run_reports_every_generation_metric(tmp_path):
    cfg = cfg_for(
        write(table(), tmp_path / "data" / "train.csv"),
        **{"fed.rounds": 2, "fed.local_steps": 3, "fed.eval_every": 1, "algorithm.lr": 0.01},
    )
    run_experiment(cfg, tmp_path / "out")
    df = pd.read_parquet(tmp_path / "out" / "metrics.parquet")
    test = df[df.client_id.notna() & (df.split == "test")]
    assert {"bleu", "chrf", "ter", "rouge_l", "loss", "bleu.shared_only"} <= set(test.metric)
    assert sorted(test.client_id.unique()) == [0, 1, 2]
    for metric in ("bleu", "chrf"):
        assert test[test.metric == metric].value.between(0, 100).all()
    assert (test[test.metric == "ter"].value >= 0).all()
    loss = df[df.metric == "train_loss.mean"].sort_values("round").value.to_numpy()
    assert loss[-1] < loss[0]
