"""One source of seeds: every stream (seed, purpose, *ids) is distinct from every other."""

from __future__ import annotations

import numpy as np
import pytest

from pf2lora_ray import seeds

RUN_PURPOSES = [
    seeds.PARTITION, seeds.SHARED_INIT, seeds.MODEL_INIT, seeds.SYNTHETIC_BASE,
    seeds.BENCH_DATA, seeds.TUNE_SEARCH,
]
CLIENT_PURPOSES = [
    seeds.PERSONAL_INIT, seeds.TEST_SPLIT, seeds.SUBSAMPLE_TRAIN, seeds.SUBSAMPLE_TEST,
    seeds.SYNTHETIC_CLIENT, seeds.SYNTHETIC_DATA, seeds.HETLORA_RANK,
    seeds.VAL_SPLIT, seeds.SUBSAMPLE_VAL,
]
ROUND_CLIENT_PURPOSES = [
    seeds.BATCHES, seeds.LOWER, seeds.UPPER, seeds.UPPER_TILDE, seeds.HVP,
    seeds.FINETUNE, seeds.EVAL_STEP,
]


def test_every_purpose_is_listed_once_with_a_distinct_code():
    assert len(set(seeds.PURPOSES.values())) == len(seeds.PURPOSES)
    listed = RUN_PURPOSES + CLIENT_PURPOSES + ROUND_CLIENT_PURPOSES
    assert sorted(listed + [seeds.CLIENT_SAMPLING, seeds.STREAM]) == sorted(seeds.PURPOSES)


def _names(num_clients: int, rounds: int, run_seeds: tuple[int, ...]):
    """Every stream name a run with these sizes derives (and a few run seeds)."""
    for s in run_seeds:
        for p in RUN_PURPOSES:
            yield (s, p)
        for k in range(num_clients):
            for p in CLIENT_PURPOSES:
                yield (s, p, k)
        for r in range(rounds + 1):
            yield (s, seeds.CLIENT_SAMPLING, r)
    s = run_seeds[0]
    for r in range(1, rounds + 1):
        for k in range(num_clients):
            for p in ROUND_CLIENT_PURPOSES:
                yield (s, p, r, k)
            for stream in (0, 1, 2, 0xE7, 0xF7):  # the numbered streams algorithms use
                yield (s, seeds.STREAM, r, k, stream)


def _pools(names) -> np.ndarray:
    """Each stream's 128-bit SeedSequence pool (equal pools <=> equal streams), one row each."""
    return np.stack([seeds.seed_sequence(*name).pool for name in names])


def test_no_two_streams_collide_for_10000_clients():
    """10,000 clients, their per-client streams and 4 rounds of every per-round stream.

    The old layout made HetLoRA's rank draw of client c equal the round-c batch
    stream of client 1255, and [seed, r, k, 0] equal [seed, r, k]; both kinds of
    coincidence would show up here as equal pools.
    """
    names = list(_names(10_000, 4, (0, 1)))
    pools = _pools(names)
    unique = np.unique(pools, axis=0)
    assert len(unique) == len(names), "two stream names give the same SeedSequence"


def test_many_rounds_no_collision():
    names = list(_names(50, 400, (0, 7)))
    assert len(np.unique(_pools(names), axis=0)) == len(names)


def test_entropy_layout_is_fixed_and_never_differs_only_by_trailing_zeros():
    a = seeds.entropy(3, seeds.BATCHES, 5, 0)
    b = seeds.entropy(3, seeds.BATCHES, 5)
    assert a[3] == 2 and b[3] == 1  # the count of ids is a field
    assert not np.array_equal(seeds.seed_sequence(3, seeds.BATCHES, 5, 0).pool,
                              seeds.seed_sequence(3, seeds.BATCHES, 5).pool)
    # A large seed takes its two words, never shifting the purpose out of place.
    big = seeds.entropy(2**40 + 1, seeds.PARTITION)
    assert list(big) == [1, 2**8, seeds.PURPOSES[seeds.PARTITION], 0]


def test_old_collisions_are_gone():
    # Formerly default_rng([seed, c, 0x4E7]) (HetLoRA rank of client c) equalled
    # default_rng([seed, round=c, client=1255, stream=0]).
    rank = seeds.rng(0, seeds.HETLORA_RANK, 3).random(4)
    batch = seeds.rng(0, seeds.BATCHES, 3, 0x4E7).random(4)
    assert not np.allclose(rank, batch)


def test_streams_are_reproducible_and_torch_matches_derive():
    torch = pytest.importorskip("torch")
    assert seeds.rng(1, seeds.LOWER, 2, 3).random() == seeds.rng(1, seeds.LOWER, 2, 3).random()
    g1 = seeds.torch_generator(1, seeds.PERSONAL_INIT, 9)
    g2 = torch.Generator().manual_seed(seeds.derive(1, seeds.PERSONAL_INIT, 9))
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    assert 0 <= seeds.derive(1, seeds.PERSONAL_INIT, 9) < 2**63


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, True])
def test_bad_ids_and_purposes_are_refused(bad):
    with pytest.raises(ValueError, match="integers in"):
        seeds.entropy(0, seeds.BATCHES, bad)
    with pytest.raises(KeyError, match="unknown random-stream purpose"):
        seeds.entropy(0, "no-such-purpose")


def test_round_context_derives_from_seeds():
    from pf2lora_ray.algorithms.base import RoundContext

    ctx = RoundContext(5, 2, 7)
    assert ctx.rng("lower").random() == seeds.rng(5, seeds.LOWER, 2, 7).random()
    assert ctx.rng().random() == seeds.rng(5, seeds.BATCHES, 2, 7).random()
    assert ctx.rng(1).random() == seeds.rng(5, seeds.STREAM, 2, 7, 1).random()
    assert ctx.rng(0).random() != ctx.rng().random()
