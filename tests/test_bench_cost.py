"""bench cost's causal-LM row: its options, its data, and the LM-head share of a step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pf2lora_ray.bench import run_bench
from pf2lora_ray.bench.cost import (
    LM_BATCH,
    LM_TOKENS,
    head_share,
    lm_job,
    write_long_webnlg,
)
from pf2lora_ray.client import ClientHost
from pf2lora_ray.config import build_config
from pf2lora_ray.experiment import UsageError


def test_an_option_the_bench_does_not_take_is_a_usage_error(tmp_path) -> None:
    with pytest.raises(UsageError, match="takes no --model"):
        run_bench("overhead", out=tmp_path / "x", model="smollm2")
    assert not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="'minilm' or 'smollm2'"):
        run_bench("cost", out=tmp_path / "y", model="gpt5")


def test_long_webnlg_rows_fill_the_token_budget_half_prompt_half_text(tmp_path) -> None:
    cfg = build_config(lm_job(write_long_webnlg(tmp_path), "tiny-llama"))
    host = ClientHost(cfg, [0])
    batch = host.task.batch(host.data[0].train, np.arange(LM_BATCH))
    assert tuple(batch["input_ids"].shape) == (LM_BATCH, LM_TOKENS)
    assert int((batch["labels"] != -100).sum()) == LM_BATCH * LM_TOKENS // 2


@pytest.mark.parametrize("logits", ["all", "targets"])
def test_head_share_finds_the_vocabulary_sized_ops(tmp_path, logits) -> None:
    torch.set_num_threads(1)
    job = lm_job(write_long_webnlg(tmp_path), "tiny-llama")
    cfg = build_config(job, [f"model.lm_logits={logits}", "algorithm.name=homlora"])
    host = ClientHost(cfg, [0])
    share = head_share(host, host.initial_shared(), 1, host.model.config.vocab_size)
    assert 0.0 < share < 1.0
    # A vocabulary size no tensor has finds nothing.
    assert head_share(host, host.initial_shared(), 2, 12345) == 0.0
