"""One file interface for local folders and object storage (pf2lora_ray.storage)."""

from __future__ import annotations

import pandas as pd
import pyarrow.fs as pafs
import pytest

from pf2lora_ray.results import METRIC_SCHEMA, write_part
from pf2lora_ray.runtime.address import check_address, host_port
from pf2lora_ray.storage import StorageError, cached_copy, check_folder, is_uri, location
from pf2lora_ray.validate import UsageError


def test_names_parse_as_local_paths_or_uris(tmp_path):
    assert not is_uri("results/s3:") and is_uri("s3://b/k") and is_uri("file:///tmp/x")
    local = location("results/sst2")
    assert local.is_local and local.uri == "results/sst2" and local.path.startswith("/")
    assert (local / "metrics.parquet").uri == "results/sst2/metrics.parquet"
    as_uri = location(f"file://{tmp_path}/run")
    assert as_uri.is_local and as_uri.path == f"{tmp_path}/run"
    with pytest.raises(StorageError, match="unknown scheme 'ftp'"):
        location("ftp://host/run")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_folder_behaves_alike_locally_and_in_a_bucket(kind, tmp_path, request):
    root = (
        location(tmp_path / "run") if kind == "local" else location(request.getfixturevalue("s3"))
    )
    run = root / "run"
    assert not run.exists() and run.iterdir() == []
    (run / "b.txt").write_text("second")
    (run / "a.txt").write_bytes(b"first")
    write_part(
        [
            {
                "run_id": "x",
                "round": 1,
                "client_id": None,
                "split": "test",
                "metric": "mse",
                "value": 0.5,
            }
        ],
        METRIC_SCHEMA,
        run / "metrics.parquet" / "part-000001.parquet",
    )
    write_part([], METRIC_SCHEMA, run / "metrics.parquet" / "part-000000.parquet")
    assert [c.name for c in run.iterdir()] == ["a.txt", "b.txt", "metrics.parquet"]
    assert run.is_dir() and (run / "a.txt").is_file() and (run / "a.txt").read_text() == "first"
    frame = (run / "metrics.parquet").read_parquet()
    assert list(frame["round"]) == [1] and pd.isna(frame["client_id"].iloc[0])
    # No temporary name is left behind (Parquet readers skip hidden names, but still).
    infos = run.fs.get_file_info(pafs.FileSelector(run.path, recursive=True))
    assert not [i.path for i in infos if i.base_name.startswith(".")]
    with cached_copy(run / "a.txt").open() as f:
        assert f.read() == "first"
    (run / "metrics.parquet").delete()
    assert not (run / "metrics.parquet").exists()
    with pytest.raises(FileNotFoundError):
        (run / "missing").read_bytes()


def test_check_folder_names_what_is_wrong(s3_server, tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(StorageError, match="f is a file, not a folder"):
        check_folder(location(tmp_path / "f" / "run"), "--out")
    check_folder(location(tmp_path / "new" / "run"), "--out")  # absent is fine
    with pytest.raises(StorageError, match="bucket 'nope' does not exist"):
        check_folder(location("s3://nope/run"), "--out")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    with pytest.raises(StorageError, match="--to s3://b/x: cannot reach its store"):
        check_folder(location("s3://b/x"), "--to")


def test_ray_addresses_are_parsed_and_probed():
    assert host_port("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert host_port("ray://head:10001") == ("head", 10001)
    assert host_port("auto") is None and host_port("") is None
    with pytest.raises(UsageError, match="job submit"):
        host_port("http://head:8265")
    with pytest.raises(UsageError, match="expected host:port"):
        host_port("head")
    with pytest.raises(UsageError, match="no Ray cluster answers"):
        check_address("127.0.0.1:1")
