"""Test setup: run from the repo root so job paths resolve; GPU tests skip without CUDA."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(autouse=True)
def _repo_root_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available() and not os.environ.get("PF2LORA_NO_GPU"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server():
    """One S3-protocol server on 127.0.0.1 for the session, its AWS_* variables in os.environ."""
    from pf2lora_ray.bench.s3 import LocalS3

    with LocalS3() as server:
        server.buckets = 0
        yield server


@pytest.fixture
def s3(s3_server):
    """A fresh empty bucket on the session's S3 server: ``s3://test-bucket-N``."""
    s3_server.buckets += 1
    return s3_server.bucket(f"test-bucket-{s3_server.buckets}")
