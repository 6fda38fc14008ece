"""Split a dataset's examples across federated clients (the Heterogeneity section of PF2LORA.md).

`partition` turns `num_examples` example indices into one index array per client
under a named scheme; the schemes are found in `SCHEMES`, a registry keyed by
name. `split_train_test` then gives each client its own train/test split, and
`split_off_validation` carves its validation rows out of that training share.

Contracts shared by every scheme:

- the parts are disjoint, together cover `range(num_examples)`, and each is a
  sorted int64 array;
- the result depends only on the arguments (all draws come from the run seed's
  `seeds.PARTITION` stream, see `pf2lora_ray.seeds`);
- no client is empty: a split that would leave one empty raises
  `PartitionError` naming the client and what to change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pf2lora_ray import seeds


class PartitionError(ValueError):
    """A partition or split is impossible or was asked for with invalid arguments."""


@dataclass(frozen=True)
class _Inputs:
    """Validated arguments of `partition`, handed to a scheme function."""

    num_examples: int
    num_clients: int
    labels: np.ndarray | None
    groups: np.ndarray | None
    alpha: float
    similarity: float
    quantity_sigma: float


_SchemeFn = Callable[[_Inputs, np.random.Generator], list[np.ndarray]]


@dataclass(frozen=True)
class _Scheme:
    """A registered scheme: its function, what it needs and how to avoid empty clients."""

    split: _SchemeFn
    needs_labels: bool
    needs_groups: bool
    remedy: str


def _iid(inputs: _Inputs, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle all examples and deal them in near-equal shares."""
    return np.array_split(rng.permutation(inputs.num_examples), inputs.num_clients)


def _dirichlet(inputs: _Inputs, rng: np.random.Generator) -> list[np.ndarray]:
    """Label-Dirichlet split (Hsu, Qi, Brown 2019, arXiv:1909.06335).

    For each label c, draw proportions p_c ~ Dir(alpha * 1_N) over the N clients
    and give client k the next floor-rounded share p_c[k] of label c's shuffled
    examples. Small alpha puts each label on few clients; large alpha tends to IID.
    """
    labels = inputs.labels
    shares: list[list[np.ndarray]] = [[] for _ in range(inputs.num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(inputs.num_clients, inputs.alpha))
        cuts = (np.cumsum(proportions)[:-1] * members.size).astype(np.int64)
        for share, chunk in zip(shares, np.split(members, cuts), strict=True):
            share.append(chunk)
    return [np.concatenate(share) for share in shares]


def _label_sort(inputs: _Inputs, rng: np.random.Generator) -> list[np.ndarray]:
    """PF2LoRA's label-sorted split with similarity s.

    A random fraction s of the examples is dealt IID; the rest is sorted by
    label and cut into N contiguous near-equal shards, client k taking shard k.
    s = 0 is a pure label sort, s = 1 is IID.
    """
    order = rng.permutation(inputs.num_examples)
    num_iid = round(inputs.similarity * inputs.num_examples)
    iid_part, sorted_part = order[:num_iid], order[num_iid:]
    sorted_part = sorted_part[np.argsort(inputs.labels[sorted_part], kind="stable")]
    iid_shards = np.array_split(iid_part, inputs.num_clients)
    label_shards = np.array_split(sorted_part, inputs.num_clients)
    return [np.concatenate(pair) for pair in zip(iid_shards, label_shards, strict=True)]


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer sizes proportional to `weights` that sum exactly to `total`."""
    exact = weights / weights.sum() * total
    sizes = np.floor(exact).astype(np.int64)
    shortfall = total - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:shortfall]] += 1
    return sizes


def _quantity(inputs: _Inputs, rng: np.random.Generator) -> list[np.ndarray]:
    """Quantity skew: client sizes proportional to LogNormal(0, quantity_sigma) draws.

    Each client first gets one example (when there are enough), the remainder is
    shared out proportionally to the draws; labels are ignored.
    """
    weights = rng.lognormal(0.0, inputs.quantity_sigma, size=inputs.num_clients)
    reserved = 1 if inputs.num_examples >= inputs.num_clients else 0
    sizes = reserved + _largest_remainder(
        weights, inputs.num_examples - reserved * inputs.num_clients
    )
    order = rng.permutation(inputs.num_examples)
    return np.split(order, np.cumsum(sizes)[:-1])


def _task(inputs: _Inputs, rng: np.random.Generator) -> list[np.ndarray]:
    """Task split: each client holds examples of one group (task, dataset or category).

    Groups are ordered by first appearance; client k serves group k mod G, and
    each group's examples are dealt IID among the clients serving it.
    """
    groups = inputs.groups
    values, first_seen = np.unique(groups, return_index=True)
    ordered = values[np.argsort(first_seen)]
    if inputs.num_clients < ordered.size:
        unserved = ordered[inputs.num_clients].item()
        raise PartitionError(
            f"task scheme: group {unserved!r} (group {inputs.num_clients} by first appearance) "
            f"would have no client; use num_clients >= {ordered.size} (one per group), "
            f"got {inputs.num_clients}"
        )
    parts: list[np.ndarray] = [np.empty(0, np.int64)] * inputs.num_clients
    for g, value in enumerate(ordered):
        clients = range(g, inputs.num_clients, ordered.size)
        members = rng.permutation(np.flatnonzero(groups == value))
        for client, share in zip(clients, np.array_split(members, len(clients)), strict=True):
            parts[client] = share
    return parts


_FEWER_CLIENTS = "use at most num_examples clients"

SCHEMES: dict[str, _Scheme] = {
    "iid": _Scheme(_iid, needs_labels=False, needs_groups=False, remedy=_FEWER_CLIENTS),
    "dirichlet": _Scheme(
        _dirichlet,
        needs_labels=True,
        needs_groups=False,
        remedy="use a larger alpha, fewer clients or another seed",
    ),
    "label_sort": _Scheme(
        _label_sort, needs_labels=True, needs_groups=False, remedy=_FEWER_CLIENTS
    ),
    "quantity": _Scheme(_quantity, needs_labels=False, needs_groups=False, remedy=_FEWER_CLIENTS),
    "task": _Scheme(
        _task,
        needs_labels=False,
        needs_groups=True,
        remedy="use fewer clients or give each group at least as many examples as clients",
    ),
}


def _as_per_example(name: str, values: np.ndarray | None, num_examples: int) -> np.ndarray | None:
    """Check that `values` (labels or groups) is 1-D with one entry per example."""
    if values is None:
        return None
    values = np.asarray(values)
    if values.ndim != 1 or values.shape[0] != num_examples:
        raise PartitionError(
            f"{name} must be 1-D with one entry per example (length {num_examples}); "
            f"got shape {values.shape}"
        )
    return values


def _validate(inputs: _Inputs, scheme: str) -> _Scheme:
    """Return the registered scheme, raising PartitionError on any invalid argument."""
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
    if inputs.num_examples < 1:
        raise PartitionError(f"num_examples must be >= 1, got {inputs.num_examples}")
    if inputs.num_clients < 1:
        raise PartitionError(f"num_clients must be >= 1, got {inputs.num_clients}")
    if not 0.0 <= inputs.similarity <= 1.0:
        raise PartitionError(f"similarity must lie in [0, 1], got {inputs.similarity}")
    if not inputs.alpha > 0.0:
        raise PartitionError(f"alpha must be > 0, got {inputs.alpha}")
    if not inputs.quantity_sigma >= 0.0:
        raise PartitionError(f"quantity_sigma must be >= 0, got {inputs.quantity_sigma}")
    registered = SCHEMES[scheme]
    if registered.needs_labels and inputs.labels is None:
        raise PartitionError(f"scheme {scheme!r} needs labels (one per example); got None")
    if registered.needs_groups and inputs.groups is None:
        raise PartitionError(f"scheme {scheme!r} needs groups (one id per example); got None")
    return registered


def partition(
    num_examples: int,
    num_clients: int,
    scheme: str,
    *,
    labels: np.ndarray | None = None,
    seed: int = 0,
    alpha: float = 0.5,
    similarity: float = 0.0,
    quantity_sigma: float = 1.0,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split example indices `0 .. num_examples - 1` across `num_clients` clients.

    Args:
        num_examples: Number of examples, >= 1.
        num_clients: Number of clients N, >= 1.
        scheme: A key of `SCHEMES`: "iid", "dirichlet" (needs labels), "label_sort"
            (needs labels), "quantity" or "task" (needs groups).
        labels: One label per example (any sortable values); used by "dirichlet"
            and "label_sort", ignored otherwise.
        seed: The run seed (draws come from its `seeds.PARTITION` stream); equal
            arguments give equal parts.
        alpha: Dirichlet concentration, > 0 ("dirichlet").
        similarity: Fraction s in [0, 1] dealt IID ("label_sort").
        quantity_sigma: Log-normal sigma of client sizes, >= 0 ("quantity").
        groups: One group id per example ("task"); needs num_clients >= number of groups.

    Returns:
        N sorted int64 arrays, disjoint and together covering every example.

    Raises:
        PartitionError: On an invalid argument, or when some client would be
            empty (the message names the client and what to change).
    """
    inputs = _Inputs(
        num_examples=num_examples,
        num_clients=num_clients,
        labels=_as_per_example("labels", labels, num_examples),
        groups=_as_per_example("groups", groups, num_examples),
        alpha=alpha,
        similarity=similarity,
        quantity_sigma=quantity_sigma,
    )
    registered = _validate(inputs, scheme)
    parts = registered.split(inputs, seeds.rng(seed, seeds.PARTITION))
    for client, part in enumerate(parts):
        if part.size == 0:
            raise PartitionError(
                f"client {client} would get no training examples under scheme {scheme!r} "
                f"({num_examples} examples, {num_clients} clients, seed {seed}); "
                f"{registered.remedy}"
            )
    return [np.sort(part).astype(np.int64) for part in parts]


def split_train_test(
    indices: np.ndarray, test_fraction: float, seed: int, client: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's example indices into its own train and test parts.

    The test part has round(test_fraction * n) examples, clamped to [1, n - 1]
    so that both parts are non-empty. The shuffle is drawn from
    stream (seed, `seeds.TEST_SPLIT`, client), so it depends only on
    (seed, client), not on the order in which clients are split.

    Args:
        indices: The client's example indices (1-D).
        test_fraction: Fraction held out for testing, in (0, 1).
        seed: Run seed, >= 0.
        client: Client index, >= 0 (also named in errors).

    Returns:
        (train, test): sorted int64 arrays, disjoint, together equal to `indices`.

    Raises:
        PartitionError: If test_fraction is outside (0, 1) or the client has
            fewer than 2 examples.
    """
    if not 0.0 < test_fraction < 1.0:
        raise PartitionError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size < 2:
        raise PartitionError(
            f"client {client} has {indices.size} example(s) and cannot be split into "
            "non-empty train and test parts; it needs at least 2 (use fewer clients)"
        )
    return _hold_out(indices, test_fraction, seeds.TEST_SPLIT, seed, client)


def _hold_out(
    indices: np.ndarray, fraction: float, stream: str, seed: int, client: int
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): round(fraction * n) rows, clamped to [1, n - 1], drawn from
    stream (seed, ``stream``, client); both sorted. ``indices`` holds >= 2 rows."""
    num_held = min(max(round(fraction * indices.size), 1), indices.size - 1)
    shuffled = seeds.rng(seed, stream, client).permutation(indices)
    return np.sort(shuffled[num_held:]), np.sort(shuffled[:num_held])


def split_off_validation(
    train: np.ndarray, val_fraction: float, seed: int, client: int
) -> tuple[np.ndarray, np.ndarray]:
    """Carve one client's validation rows out of its training share.

    The validation part has round(val_fraction * n) rows, clamped to [1, n - 1]
    when val_fraction > 0, and is empty when it is 0 (the training share is then
    returned unchanged). The shuffle comes from stream (seed, `seeds.VAL_SPLIT`,
    client), so the validation rows depend only on (seed, client), and training
    never sees them.

    Args:
        train: The client's training indices (1-D), as `split_train_test` returns them.
        val_fraction: Fraction of the training share held out, in [0, 1).
        seed: Run seed, >= 0.
        client: Client index, >= 0 (also named in errors).

    Returns:
        (train, val): sorted int64 arrays, disjoint, together equal to `train`.

    Raises:
        PartitionError: If val_fraction is outside [0, 1) or a positive fraction
            leaves the client fewer than 2 training rows to split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise PartitionError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    train = np.asarray(train, dtype=np.int64)
    if val_fraction == 0.0:
        return train, np.empty(0, np.int64)
    if train.size < 2:
        raise PartitionError(
            f"client {client} has {train.size} training example(s) and cannot give up "
            "validation rows; it needs at least 2 (use fewer clients or data.val_fraction=0)"
        )
    return _hold_out(train, val_fraction, seeds.VAL_SPLIT, seed, client)


def label_histogram(parts: Sequence[np.ndarray], labels: np.ndarray, num_labels: int) -> np.ndarray:
    """Count each client's examples per label.

    Args:
        parts: Per-client index arrays (as returned by `partition`).
        labels: Integer label per example, each in [0, num_labels).
        num_labels: Number of label values.

    Returns:
        int64 array of shape (clients, num_labels); entry [k, c] counts client
        k's examples with label c.

    Raises:
        ValueError: If a label lies outside [0, num_labels).
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(
            f"labels must lie in [0, {num_labels}); got range [{labels.min()}, {labels.max()}]"
        )
    counts = [np.bincount(labels[part], minlength=num_labels) for part in parts]
    return np.stack(counts).astype(np.int64) if counts else np.zeros((0, num_labels), np.int64)
