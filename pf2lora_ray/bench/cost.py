"""``cost``: what PF2LoRA's bilevel step costs a client, against HOMLoRA's plain step.

Variants (same model, adapters on the family's default targets, batch
16 x 64 tokens), with the forward/backward passes one local step makes
(``passes``; a double-backward pass counted as one pass plus its extra graph):

- ``pf2lora-paper-autograd`` (default): Algorithm 1, four batches; lower step,
  grad_x at y+, grad_y at y+, and the mixed term by double backward over two
  half-batch slices of zeta (``pf2lora.hvp_chunks=2``): 3 + 1 passes;
- ``pf2lora-paper-autograd-1chunk``: the same with the double backward over the
  whole of zeta at once (``hvp_chunks=1``);
- ``pf2lora-paper-fd``: the same with the mixed term as a central difference of
  grad_x at y +- eps v: 5 plain passes, no double backward;
- ``pf2lora-shared_batches``: the first implementation, one graph through the
  lower step (create_graph) and the upper loss: 2 passes, the second a double
  backward that also keeps the lower step's graph alive;
- ``pf2lora-first_order``: lower step + grad_x at y+ (the ablation): 2 passes;
- ``homlora``: 1 pass.

Each variant runs twice, each time in a fresh Python process:

- ``s_per_step``: median wall time of one local step on one torch thread (what
  a client gets in a 1-CPU actor), from one-step ``train`` calls after a
  warm-up call, with the default allocator;
- ``peak_rss_delta_mb``: peak RSS during one step minus the RSS just before
  it (model and data already built): activations, autograd graphs and
  optimizer state, the memory a client's step adds to its actor. Measured in
  a second process with ``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc maps
  every large block (activations) on its own and returns it on free: RSS then
  follows the live tensors instead of what the heap kept from earlier passes
  (with the default allocator, a variant that makes more passes keeps more
  freed memory and looks bigger than it is). That setting slows allocation,
  which is why time is measured in the other process;
- ``trainable_params`` / ``communicated_params``: per client, from the
  algorithm's own accounting (``trainable_names``, ``communicated_names``);
  communicated parameters travel once each way per round as float32.

Full: all-MiniLM-L6-v2 (``model.name=minilm``), 5 timed steps, variants
alternated twice. Quick: the same with 2 timed steps, once.

``--model smollm2`` (needs ``./setup.sh nlg``): the causal-LM row, SmolLM2-135M
with LoRA on q/v of all 30 layers, WebNLG-layout rows of 4 x 96 tokens (48
prompt, 48 text), HOMLoRA, PF2LoRA (default) and first-order PF2LoRA, each
with the LM head's logits at every position (``model.lm_logits=all``, the
``-all-logits`` variants: before) and only at the target positions (the
default: after). Besides the metrics above:

- ``cpu_s_per_step``: median CPU seconds of the process per step (one thread:
  the time it computed, which a shared machine's load inflates less than wall
  time);
- ``lm_head_share``: share of the op time of one profiled step
  (``torch.profiler``, self CPU time) spent in ops on a vocabulary-sized tensor:
  the head's matrix products forward and backward, the log-softmax, the loss
  and their double backward;
- ``load_avg_1m``: the machine's load when the variant finished.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pf2lora_ray.bench.common import rows_for, rows_needed, text_job, write_sst2_like
from pf2lora_ray.validate import UsageError

PF2LORA = {"algorithm.name": "pf2lora"}
VARIANTS: dict[str, dict[str, Any]] = {
    "pf2lora-paper-autograd": {**PF2LORA, "pf2lora.estimator": "paper", "pf2lora.hvp": "autograd"},
    "pf2lora-paper-autograd-1chunk": {
        **PF2LORA, "pf2lora.estimator": "paper", "pf2lora.hvp": "autograd", "pf2lora.hvp_chunks": 1,
    },
    "pf2lora-paper-fd": {
        **PF2LORA, "pf2lora.estimator": "paper", "pf2lora.hvp": "finite_difference",
    },
    "pf2lora-shared_batches": {**PF2LORA, "pf2lora.estimator": "shared_batches"},
    "pf2lora-first_order": {**PF2LORA, "pf2lora.hypergrad": "first_order"},
    "homlora": {"algorithm.name": "homlora"},
}
# Forward/backward passes per local step (module docstring); double backward counts once.
PASSES = {
    "pf2lora-paper-autograd": 4,
    "pf2lora-paper-autograd-1chunk": 4,
    "pf2lora-paper-fd": 5,
    "pf2lora-shared_batches": 2,
    "pf2lora-first_order": 2,
    "homlora": 1,
}
BATCH, TOKENS, MODEL = 16, 64, "minilm"

# The causal-LM row (--model smollm2): before/after target-only logits.
ALL_LOGITS = {"model.lm_logits": "all"}
LM_VARIANTS: dict[str, dict[str, Any]] = {
    "homlora-all-logits": {"algorithm.name": "homlora", **ALL_LOGITS},
    "homlora": {"algorithm.name": "homlora"},
    "pf2lora-paper-autograd-all-logits": {**VARIANTS["pf2lora-paper-autograd"], **ALL_LOGITS},
    "pf2lora-paper-autograd": VARIANTS["pf2lora-paper-autograd"],
    "pf2lora-first_order": VARIANTS["pf2lora-first_order"],
}
LM_BATCH, LM_TOKENS, LM_MODEL, LM_VOCAB = 4, 96, "smollm2", 49152


def job(data: Path) -> dict[str, Any]:
    return text_job(
        data,
        model=MODEL,
        num_clients=1,
        clients_per_round=1,
        rounds=1,
        local_steps=1,
        train_per_client=4 * BATCH,
        batch_size=BATCH,
        max_length=TOKENS,
    )


def lm_job(data: Path, model: str | Path = LM_MODEL) -> dict[str, Any]:
    """One client on WebNLG-layout rows of exactly LM_TOKENS tokens, batches of LM_BATCH."""
    return {
        "seed": 0,
        "model": {"name": str(model)},
        "data": {
            "name": "webnlg",
            "path": str(data.resolve()),
            "partition": "iid",
            "max_length": LM_TOKENS,
            "batch_size": LM_BATCH,
        },
        "adapter": {"r": 8, "r_personal": 2, "alpha": 16.0},
        "fed": {"num_clients": 1, "clients_per_round": 1, "rounds": 1, "local_steps": 1},
        "algorithm": {"name": "pf2lora", "lr": 0.001},
        "runtime": {"quiet": True},
    }


def float_copy(folder: Path) -> Path:
    """SmolLM2 dequantised once and saved as a float32 folder (model + tokenizer).

    Reading the GGUF file dequantises 272 tensors and parses its tokenizer (20-40 s
    on 2 shared cores); the bench starts 10 processes, which read this copy in seconds.
    """
    if not (folder / "config.json").is_file():
        from pf2lora_ray.config import ModelConfig
        from pf2lora_ray.models import load_model

        model, tokenizer, _ = load_model(ModelConfig(name=LM_MODEL), "causal_lm")
        # transformers marks a GGUF-loaded model as quantized and refuses to save it,
        # although its weights are float32 by now: a plain copy of the same class saves.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        plain = type(model)(type(model.config).from_dict(config))
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def write_long_webnlg(folder: Path, entries: int = 40) -> Path:
    """A WebNLG-layout ``train.json`` whose every row fills LM_TOKENS tokens.

    Eight triples make a prompt longer than half of LM_TOKENS and a 90-word text
    a target longer than the rest, so the task truncates every row to
    LM_TOKENS / 2 prompt + LM_TOKENS / 2 text tokens.
    """
    rng = np.random.default_rng(0)
    words = ("river", "city", "airport", "runway", "people", "north", "built", "served",
             "country", "language", "museum", "bridge", "founded", "leader", "area")
    items = []
    for i in range(entries):
        triples = [{"subject": f"Place_{i}", "property": f"property{j}",
                    "object": f"{' '.join(rng.choice(words, 3))}"} for j in range(8)]
        text = " ".join(rng.choice(words, 90)).capitalize() + "."
        items.append({str(i + 1): {"category": "Place", "modifiedtripleset": triples,
                                   "lexicalisations": [{"lex": text}]}})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps({"entries": items}))
    return folder


def head_share(host: Any, theta: Any, round_: int, vocab: int) -> float:
    """Share of one profiled step's op time in ops on a tensor with a ``vocab``-sized dim."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        host.train(theta, round_, [0])
    total = head = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        total += event.self_cpu_time_total
        shapes = [s for s in event.input_shapes or [] if s and isinstance(s[0], int)]
        # The frozen embedding lookup reads the (tied) vocab x hidden matrix too: not the head.
        if event.key != "aten::embedding" and any(vocab in s for s in shapes):
            head += event.self_cpu_time_total
    return head / total if total else float("nan")


def worker(
    overrides: dict[str, Any], extra: dict[str, Any], steps: int, vocab: int = 0
) -> dict[str, float]:
    """Inside the fresh process: build one client, time ``steps`` one-step rounds.

    With ``vocab`` > 0 one more step runs under the profiler (:func:`head_share`).
    """
    import psutil
    import torch

    from pf2lora_ray.client import ClientHost
    from pf2lora_ray.config import build_config

    torch.set_num_threads(1)  # what a client gets inside a 1-CPU actor
    cfg = build_config(overrides, extra=extra)
    host = ClientHost(cfg, [0])
    theta = host.initial_shared()
    params = dict(host.model.named_parameters())
    first = host.task.batch(host.data[0].train, np.arange(cfg.data.batch_size))
    baseline_mb = psutil.Process().memory_info().rss / 2**20
    host.train(theta, 1, [0])  # warm-up: allocator pools, lazy initialisation
    times, cpu = [], []
    for t in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        host.train(theta, 2 + t, [0])
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    count = lambda names: float(sum(params[n].numel() for n in names))  # noqa: E731
    extra_rows = {}
    if vocab:
        extra_rows["lm_head_share"] = head_share(host, theta, 2 + steps, vocab)
        extra_rows["target_positions"] = float((first["labels"][:, 1:] != -100).sum())
    return {
        **extra_rows,
        "s_per_step": float(np.median(times)),
        "s_per_step_min": float(np.min(times)),
        "cpu_s_per_step": float(np.median(cpu)),
        "load_avg_1m": os.getloadavg()[0],
        "peak_rss_mb": peak_mb,
        "peak_rss_delta_mb": peak_mb - baseline_mb,
        "trainable_params": count(host.algorithm.trainable_names(host.roles)),
        "communicated_params": count(host.algorithm.communicated_names(host.roles)),
        "batch_tokens": float(first["input_ids"].numel()),
        "torch_threads": float(torch.get_num_threads()),
    }


MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # large blocks mapped and unmapped one by one
MEMORY_KEYS = ("peak_rss_mb", "peak_rss_delta_mb")


def run_variant(
    overrides: dict[str, Any], extra: dict[str, Any], steps: int, vocab: int = 0
) -> dict[str, float]:
    """Time in one fresh interpreter, memory in another (:data:`MEMORY_ENV`); merged results."""
    timed = _spawn(overrides, extra, steps, {}, vocab)
    memory = _spawn(overrides, extra, 1, MEMORY_ENV)
    timed.update({k: memory[k] for k in MEMORY_KEYS})
    return timed


def _spawn(
    overrides: dict[str, Any], extra: dict[str, Any], steps: int, env: dict[str, str],
    vocab: int = 0,
) -> dict[str, float]:
    """Run :func:`worker` in a fresh interpreter with ``env`` added; its JSON result."""
    spec = json.dumps({"overrides": overrides, "extra": extra, "steps": steps, "vocab": vocab})
    done = subprocess.run(
        [sys.executable, "-m", "pf2lora_ray.bench.cost"],
        input=spec,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )
    if done.returncode != 0:
        raise RuntimeError(f"cost worker failed ({extra}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool, out: Path, model: str = MODEL) -> list[dict[str, Any]]:
    """Every variant of ``model`` (minilm, or smollm2 for the causal-LM row), alternated."""
    steps, repeats = (2, 1) if quick else (5, 2)
    if model == MODEL:
        data = write_sst2_like(out / "data", rows_needed(1, 4 * BATCH), words=TOKENS + 8)
        overrides, variants, vocab = job(data), VARIANTS, 0
    elif model == LM_MODEL:
        data, model_dir = write_long_webnlg(out / "data"), float_copy(out / "smollm2-float32")
        overrides, variants, vocab = lm_job(data, model_dir), LM_VARIANTS, LM_VOCAB
    else:
        raise UsageError(f"--model {model!r}: bench cost measures {MODEL!r} or {LM_MODEL!r}")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for _ in range(repeats):  # alternate A/B/C/A/B/C so drifting load hits all alike
        for name, extra in variants.items():
            results[name].append(run_variant(overrides, extra, steps, vocab))
    rows: list[dict[str, Any]] = []
    medians = {
        name: {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        for name, runs in results.items()
    }
    for name, m in medians.items():
        # Ratios against HOMLoRA computing its logits the same way (all or targets only).
        base = medians["homlora-all-logits" if name.endswith("-all-logits") else "homlora"]
        m["s_per_step_vs_homlora"] = m["s_per_step"] / base["s_per_step"]
        m["cpu_s_per_step_vs_homlora"] = m["cpu_s_per_step"] / base["cpu_s_per_step"]
        m["peak_rss_delta_vs_homlora"] = m["peak_rss_delta_mb"] / base["peak_rss_delta_mb"]
        before = medians.get(f"{name}-all-logits")
        if before is not None:  # target-only logits against all-position logits
            m["cpu_s_per_step_vs_all_logits"] = m["cpu_s_per_step"] / before["cpu_s_per_step"]
            m["peak_rss_delta_vs_all_logits"] = (
                m["peak_rss_delta_mb"] / before["peak_rss_delta_mb"]
            )
        m["communicated_kb_per_round"] = m["communicated_params"] * 4 * 2 / 1024
        m["passes_per_step"] = float(PASSES[name.removesuffix("-all-logits")])
        rows += rows_for(name, m)
    return rows


if __name__ == "__main__":
    spec = json.loads(sys.stdin.read())
    print(json.dumps(worker(spec["overrides"], spec["extra"], spec["steps"], spec["vocab"])))
