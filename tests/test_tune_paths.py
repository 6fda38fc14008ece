"""Tune trials run in their own folders: a relative data.path must still name the data."""

from __future__ import annotations

import os
from pathlib import Path

from helpers import tiny_synthetic

from pf2lora_ray.tune.search import absolute_paths


def test_relative_data_path_is_made_absolute_for_trials(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.tsv").write_text("sentence\tlabel\nok\t1\n")
    cfg, plain = tiny_synthetic("data.path=data"), tiny_synthetic()
    monkeypatch.chdir(tmp_path)
    moved = absolute_paths(cfg)
    assert Path(moved.data.path) == tmp_path / "data" and Path(moved.data.path).is_absolute()
    os.chdir("/")  # where a trial might run: the path still names the folder
    assert Path(moved.data.path).is_dir()
    assert absolute_paths(plain) is plain  # no data.path: nothing to resolve
