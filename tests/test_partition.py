"""Partitioners: label distributions, determinism, coverage and error messages."""

from __future__ import annotations

import numpy as np
import pytest

from pf2lora_ray.data.partition import (
    SCHEMES,
    PartitionError,
    label_histogram,
    partition,
    split_train_test,
)

BINARY = np.repeat([0, 1], 200)  # balanced binary labels, 400 examples
TEN_LABELS = np.repeat(np.arange(10), 40)  # 10 labels x 40 examples
GROUPS = np.array(["b"] * 30 + ["a"] * 50 + ["b"] * 20)  # "b" appears first

# One call per scheme that must succeed, with arguments that use randomness.
CASES = {
    "iid": dict(num_examples=400, num_clients=4),
    "dirichlet": dict(num_examples=400, num_clients=4, labels=TEN_LABELS, alpha=0.5),
    "label_sort": dict(num_examples=400, num_clients=4, labels=BINARY, similarity=0.5),
    "quantity": dict(num_examples=400, num_clients=4, quantity_sigma=1.0),
    "task": dict(num_examples=100, num_clients=4, groups=GROUPS),
}


def test_every_registered_scheme_is_tested() -> None:
    assert set(CASES) == set(SCHEMES)


@pytest.mark.parametrize("scheme", sorted(CASES))
def test_parts_are_sorted_disjoint_and_cover_all(scheme: str) -> None:
    args = CASES[scheme]
    parts = partition(scheme=scheme, seed=0, **args)
    assert len(parts) == args["num_clients"]
    for part in parts:
        assert part.dtype == np.int64
        assert part.size > 0
        assert np.all(np.diff(part) > 0)
    everything = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(everything, np.arange(args["num_examples"]))


@pytest.mark.parametrize("scheme", sorted(CASES))
def test_deterministic_given_seed(scheme: str) -> None:
    args = CASES[scheme]
    first = partition(scheme=scheme, seed=3, **args)
    again = partition(scheme=scheme, seed=3, **args)
    other = partition(scheme=scheme, seed=4, **args)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_deals_evenly_and_roughly_balanced() -> None:
    parts = partition(400, 4, "iid", seed=0)
    assert [p.size for p in parts] == [100] * 4
    share_of_label_1 = label_histogram(parts, BINARY, 2)[:, 1] / 100
    assert np.all(np.abs(share_of_label_1 - 0.5) < 0.15)


def test_label_sort_without_similarity_gives_each_client_one_label() -> None:
    parts = partition(400, 2, "label_sort", labels=BINARY, similarity=0.0, seed=0)
    np.testing.assert_array_equal(label_histogram(parts, BINARY, 2), [[200, 0], [0, 200]])


def test_label_sort_shards_are_contiguous_in_label_order() -> None:
    parts = partition(400, 4, "label_sort", labels=BINARY, similarity=0.0, seed=0)
    np.testing.assert_array_equal(
        label_histogram(parts, BINARY, 2), [[100, 0], [100, 0], [0, 100], [0, 100]]
    )


def test_label_sort_similarity_mixes_in_iid_share() -> None:
    # s = 0.5: each client gets ~100 IID examples (half of each label) plus 100
    # label-sorted ones, so its majority label holds ~75% of its data.
    parts = partition(400, 2, "label_sort", labels=BINARY, similarity=0.5, seed=0)
    hist = label_histogram(parts, BINARY, 2)
    assert hist.sum() == 400
    assert 0.65 < hist[0, 0] / hist[0].sum() < 0.85
    assert 0.65 < hist[1, 1] / hist[1].sum() < 0.85


def test_label_sort_full_similarity_is_iid() -> None:
    parts = partition(400, 2, "label_sort", labels=BINARY, similarity=1.0, seed=0)
    share_of_label_0 = label_histogram(parts, BINARY, 2)[:, 0] / 200
    assert np.all(np.abs(share_of_label_0 - 0.5) < 0.1)


def test_dirichlet_tiny_alpha_puts_each_label_on_one_client() -> None:
    parts = partition(400, 4, "dirichlet", labels=TEN_LABELS, alpha=1e-3, seed=0)
    hist = label_histogram(parts, TEN_LABELS, 10)
    top_client_share = hist.max(axis=0) / hist.sum(axis=0)
    assert top_client_share.mean() > 0.95


def test_dirichlet_huge_alpha_is_near_uniform() -> None:
    parts = partition(400, 4, "dirichlet", labels=TEN_LABELS, alpha=1e4, seed=0)
    hist = label_histogram(parts, TEN_LABELS, 10)
    # each label has 40 examples, so a uniform split gives 10 per client
    assert np.all(np.abs(hist - 10) <= 3)


def test_quantity_sizes_are_skewed_but_never_zero() -> None:
    sizes = [p.size for p in partition(400, 8, "quantity", quantity_sigma=1.5, seed=0)]
    assert sum(sizes) == 400
    assert max(sizes) > 3 * min(sizes)
    extreme = partition(20, 10, "quantity", quantity_sigma=5.0, seed=0)
    assert all(p.size >= 1 for p in extreme)


def test_quantity_zero_sigma_is_even() -> None:
    assert [p.size for p in partition(400, 4, "quantity", quantity_sigma=0.0)] == [100] * 4


def test_task_assigns_clients_round_robin_to_groups_by_first_appearance() -> None:
    parts = partition(100, 5, "task", groups=GROUPS, seed=0)
    held = [set(GROUPS[p]) for p in parts]
    # "b" appears first, so clients 0, 2, 4 hold "b" and clients 1, 3 hold "a"
    assert held == [{"b"}, {"a"}, {"b"}, {"a"}, {"b"}]
    assert sorted(p.size for p in parts[0::2]) == [16, 17, 17]  # 50 "b" over 3 clients
    assert [p.size for p in parts[1::2]] == [25, 25]  # 50 "a" over 2 clients


def test_task_with_fewer_clients_than_groups_names_the_unserved_group() -> None:
    with pytest.raises(PartitionError, match=r"group 'a'.*num_clients >= 2"):
        partition(100, 1, "task", groups=GROUPS)


def test_empty_client_error_names_the_client() -> None:
    with pytest.raises(PartitionError, match=r"^client 3 would get no training examples.*'iid'"):
        partition(3, 5, "iid")


def test_empty_task_client_is_named() -> None:
    # group "a" (first) has 1 example and clients 0 and 2; client 2 gets nothing
    groups = np.array(["a", "b", "b", "b", "b", "b"])
    with pytest.raises(PartitionError, match=r"^client 2 would get no training examples"):
        partition(6, 4, "task", groups=groups)


def test_dirichlet_empty_client_error_suggests_larger_alpha() -> None:
    # one label and alpha -> 0: one client takes (almost) everything
    with pytest.raises(PartitionError, match=r"client [0-2] would get no .*larger alpha"):
        partition(30, 3, "dirichlet", labels=np.zeros(30, int), alpha=1e-3, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(scheme="nope"), "unknown scheme 'nope'"),
        (dict(scheme="iid", num_clients=0), "num_clients must be >= 1"),
        (dict(scheme="label_sort", labels=BINARY, similarity=1.5), r"similarity must lie in"),
        (dict(scheme="dirichlet", labels=BINARY, alpha=0.0), "alpha must be > 0"),
        (dict(scheme="dirichlet"), "needs labels"),
        (dict(scheme="task"), "needs groups"),
        (dict(scheme="label_sort", labels=BINARY[:10]), r"labels must be 1-D .*length 400"),
    ],
)
def test_invalid_arguments_are_named(kwargs: dict, message: str) -> None:
    args = dict(num_examples=400, num_clients=2) | kwargs
    with pytest.raises(PartitionError, match=message):
        partition(**args)


def test_split_train_test_sizes_disjoint_and_deterministic() -> None:
    indices = np.arange(100, 110)
    train, test = split_train_test(indices, 0.2, seed=0, client=1)
    assert (train.size, test.size) == (8, 2)
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), indices)
    again = split_train_test(indices, 0.2, seed=0, client=1)
    np.testing.assert_array_equal(again[1], test)
    others = [split_train_test(indices, 0.2, seed=0, client=c)[1] for c in range(2, 6)]
    assert any(not np.array_equal(o, test) for o in others)


def test_split_train_test_keeps_both_parts_non_empty() -> None:
    train, test = split_train_test(np.array([4, 9]), 0.01, seed=0, client=0)
    assert (train.size, test.size) == (1, 1)


def test_split_train_test_names_client_that_cannot_be_split() -> None:
    with pytest.raises(PartitionError, match=r"^client 7 has 1 example"):
        split_train_test(np.array([5]), 0.2, seed=0, client=7)


def test_label_histogram_counts() -> None:
    labels = np.array([0, 1, 1, 2, 0])
    parts = [np.array([0, 1]), np.array([2, 3, 4])]
    np.testing.assert_array_equal(label_histogram(parts, labels, 3), [[1, 1, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        label_histogram(parts, labels, 2)
