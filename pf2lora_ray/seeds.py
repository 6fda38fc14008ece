"""Every random stream of a run, derived in one place.

A stream is named by ``(run seed, purpose, *ids)``: the purpose is one of the
named constants below (what the draws are for) and the ids say whose draws
they are (round, client, ...). :func:`rng` and :func:`torch_generator` turn such
a name into a generator; nothing else in the package seeds a generator by hand,
so two purposes can never share a stream by accident.

Why a module for this: numpy's ``SeedSequence`` ignores trailing zero words of
its entropy (``[s, r, c]`` and ``[s, r, c, 0]`` give one stream), and a long
integer becomes several words, so ad-hoc tuples such as ``[seed, round, client,
stream]`` and ``[seed, client, tag]`` collide. Here every name is encoded as a
fixed layout of 32-bit words::

    [seed lo, seed hi, purpose code, number of ids, id_1 lo, id_1 hi, ..., id_n lo, id_n hi]

Each field has a fixed position and width (64-bit values as two words), and the
count of ids is itself a field, so two different names either differ in a word
at the same position or in their ``number of ids`` word; never only in trailing
zeros. Purpose codes are fixed small integers: renaming a constant is free,
changing its code changes every result that depends on it.

Example::

    from pf2lora_ray import seeds
    order = seeds.rng(cfg.seed, seeds.CLIENT_SAMPLING, round_).permutation(n)
    gen = seeds.torch_generator(cfg.seed, seeds.PERSONAL_INIT, client_id)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported only by torch_generator's callers
    import torch

# ---------------------------------------------------------------- purposes
# Run-level draws (ids: none).
PARTITION = "partition"  # data.partition over all clients
SHARED_INIT = "shared_init"  # theta_0: the shared LoRA factors
MODEL_INIT = "model_init"  # the global torch seed while the base model and head are built
SYNTHETIC_BASE = "synthetic_base"  # synthetic task: W0 and the common update U0 V0
BENCH_DATA = "bench_data"  # benchmark workloads (bench/common.py)
TUNE_SEARCH = "tune_search"  # Ray Tune's random search

# Per-client draws (ids: client).
PERSONAL_INIT = "personal_init"  # phi_k: the personal factors C_k (and friends)
TEST_SPLIT = "test_split"  # the client's own train/test split
SUBSAMPLE_TRAIN = "subsample_train"  # data.max_train_per_client
SUBSAMPLE_TEST = "subsample_test"  # data.max_test_per_client
VAL_SPLIT = "val_split"  # data.val_fraction: the validation rows carved from the training share
SUBSAMPLE_VAL = "subsample_val"  # data.max_val_per_client
SYNTHETIC_CLIENT = "synthetic_client"  # synthetic task: the client's own update U_k V_k
SYNTHETIC_DATA = "synthetic_data"  # synthetic task: the client's x and noise
HETLORA_RANK = "hetlora_rank"  # HetLoRA: the client's initial rank

# Per-round draws (ids: round).
CLIENT_SAMPLING = "client_sampling"  # which clients take part in the round

# Per-(round, client) draws (ids: round, client, ...): a client's local update.
BATCHES = "batches"  # the mini-batch order of plain local training
LOWER = "lower"  # PF2LoRA: lower-level batches (pi)
UPPER = "upper"  # PF2LoRA: upper-level batches (xi)
UPPER_TILDE = "upper_tilde"  # PF2LoRA: the second upper-level batch (xi~)
HVP = "hvp"  # PF2LoRA: the batch of the mixed second-order term (zeta)
FINETUNE = "finetune"  # homlora_ft: evaluation fine-tuning batches
EVAL_STEP = "eval_step"  # per_fedavg: the adaptation step before evaluation
STREAM = "stream"  # numbered batch streams (ids: round, client, stream number)

#: Fixed code of every purpose. Codes are part of the results: never reuse or change one.
PURPOSES: dict[str, int] = {
    PARTITION: 1,
    SHARED_INIT: 2,
    MODEL_INIT: 3,
    SYNTHETIC_BASE: 4,
    BENCH_DATA: 5,
    TUNE_SEARCH: 6,
    PERSONAL_INIT: 20,
    TEST_SPLIT: 21,
    SUBSAMPLE_TRAIN: 22,
    SUBSAMPLE_TEST: 23,
    SYNTHETIC_CLIENT: 24,
    SYNTHETIC_DATA: 25,
    HETLORA_RANK: 26,
    VAL_SPLIT: 27,
    SUBSAMPLE_VAL: 28,
    CLIENT_SAMPLING: 40,
    BATCHES: 60,
    LOWER: 61,
    UPPER: 62,
    UPPER_TILDE: 63,
    HVP: 64,
    FINETUNE: 65,
    EVAL_STEP: 66,
    STREAM: 67,
}

_MAX = 2**64  # every seed and id is an integer in [0, 2**64)


def entropy(seed: int, purpose: str, *ids: int) -> np.ndarray:
    """The 32-bit words that name the stream ``(seed, purpose, *ids)`` (layout above).

    Raises:
        KeyError: ``purpose`` is not one of :data:`PURPOSES`.
        ValueError: the seed or an id is not an integer in [0, 2**64).
    """
    if purpose not in PURPOSES:
        raise KeyError(f"unknown random-stream purpose {purpose!r}; add it to seeds.PURPOSES")
    values = (seed, *ids)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < _MAX:
            raise ValueError(
                f"seed stream {purpose!r}: seed and ids must be integers in [0, 2**64), "
                f"got {values}"
            )
    words = np.empty(4 + 2 * len(ids), dtype=np.uint32)
    words[0], words[1] = int(seed) & 0xFFFFFFFF, int(seed) >> 32
    words[2], words[3] = PURPOSES[purpose], len(ids)
    for i, v in enumerate(ids):
        words[4 + 2 * i], words[5 + 2 * i] = int(v) & 0xFFFFFFFF, int(v) >> 32
    return words


def seed_sequence(seed: int, purpose: str, *ids: int) -> np.random.SeedSequence:
    """numpy's ``SeedSequence`` for the stream ``(seed, purpose, *ids)``."""
    return np.random.SeedSequence(entropy(seed, purpose, *ids))


def rng(seed: int, purpose: str, *ids: int) -> np.random.Generator:
    """A numpy generator for the stream ``(seed, purpose, *ids)``."""
    return np.random.default_rng(seed_sequence(seed, purpose, *ids))


def derive(seed: int, purpose: str, *ids: int) -> int:
    """A 63-bit integer seed for the stream, for APIs that take an int (torch, Ray Tune)."""
    return int(seed_sequence(seed, purpose, *ids).generate_state(1, np.uint64)[0] >> 1)


def torch_generator(seed: int, purpose: str, *ids: int) -> torch.Generator:
    """A CPU ``torch.Generator`` for the stream ``(seed, purpose, *ids)``."""
    import torch

    return torch.Generator().manual_seed(derive(seed, purpose, *ids))
