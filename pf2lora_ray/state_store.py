"""Clients' personal state behind one store: a bounded working set in memory, the rest on disk.

pfl-research keeps per-user state behind a storage interface (memory or disk);
:class:`StateStore` is ours. A :class:`~pf2lora_ray.client.ClientHost` keeps
each of its clients' personal state phi_k here. With ``budget_bytes = 0``
(``runtime.state_memory_mb`` unset, the default) everything stays in memory as
a plain dict would. With a budget, the least recently used clients' state is
*spilled* to a local folder once the in-memory bytes pass the budget, and read
back when the client is next used.

Why one safetensors file per client, not a memory map:

- a client's state is written and read whole, so a file per client makes a
  spill or a read O(that client), and a damaged file damages one client;
- personal state differs in size between algorithms (HetLoRA's ranks,
  PF2LoRA's persisted AdamW moments), which a memory map of fixed slots would
  have to know in advance and manage free space for;
- safetensors is the format checkpoints already use: no pickle, dtypes
  (bfloat16 too) and shapes self-describing, and the OS page cache serves
  recently spilled clients without a read from disk.

Each spilled file's blake2b digest is kept in memory and checked on every read,
so a truncated or altered file raises :class:`StateCorrupted` naming the client,
never hands back wrong numbers. A state read back and not changed since is not
written again when it is evicted (its file is still current), and a client's
*fresh* state (its initial state, drawn from (seed, client), not trained yet) is
never written at all: evicted, it is dropped and drawn again when next needed,
so evaluating a population costs disk only for the clients that trained.
Tensors round-trip bit for bit, so a run with a budget equals the
all-in-memory run exactly.

The folder belongs to the process that made it (nothing else reads it) and is
removed by :meth:`StateStore.close` or when the store is garbage collected.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

Tensors = dict[str, torch.Tensor]


class StateCorrupted(RuntimeError):
    """A client's spilled personal state is missing, truncated or altered on disk."""


def nbytes(tensors: Tensors) -> int:
    """Bytes of the tensors' data."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _digest(blob: bytes) -> str:
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


class StateStore:
    """client id -> its personal state (name -> tensor), within ``budget_bytes`` of memory.

    Args:
        budget_bytes: bytes of state kept in memory; 0 = no bound, nothing is spilled.
        folder: where the spill folder is created (default: the system temp folder).
        device: where states read back from disk are put.

    The most recently used state always stays in memory, even when alone it
    exceeds the budget. ``spilled_bytes`` / ``read_bytes`` count the bytes
    written to and read back from disk since the last :meth:`take_counts`.
    """

    def __init__(
        self, budget_bytes: int = 0, folder: str | Path | None = None, device: str = "cpu"
    ) -> None:
        self.budget = int(budget_bytes)
        self.device = torch.device(device)
        self.memory: OrderedDict[int, Tensors] = OrderedDict()  # least recently used first
        self.memory_bytes = 0
        self.clean: set[int] = set()  # in memory and identical to their file on disk
        self.fresh: set[int] = set()  # in memory, their initial state: dropped, not spilled
        self.on_disk: dict[int, str] = {}  # client -> digest of its file
        self.spilled_bytes = 0
        self.read_bytes = 0
        self.root: Path | None = None
        self._folder = folder
        self._finalizer: weakref.finalize | None = None

    # ------------------------------------------------------------ mapping
    def __contains__(self, client_id: object) -> bool:
        return client_id in self.memory or client_id in self.on_disk

    def __len__(self) -> int:
        return len(self.memory.keys() | self.on_disk.keys())

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self.memory.keys() | self.on_disk.keys()))

    def __getitem__(self, client_id: int) -> Tensors:
        state = self.get(client_id)
        if state is None:
            raise KeyError(client_id)
        return state

    def get(self, client_id: int) -> Tensors | None:
        """The client's state (read back from disk if spilled), or None if it has none."""
        k = int(client_id)
        if k in self.memory:
            self.memory.move_to_end(k)
            return self.memory[k]
        if k not in self.on_disk:
            return None
        state = self._read(k)
        self._keep(k, state)
        self.clean.add(k)
        self._evict()
        return state

    def put(self, client_id: int, state: Tensors, fresh: bool = False) -> None:
        """Set the client's state (replacing any, in memory or on disk).

        ``fresh``: the client's initial state, which its owner can draw again
        from (seed, client): evicted, it is forgotten instead of written.
        """
        k = int(client_id)
        self._forget(k, keep_file=not fresh)  # a kept file is rewritten on eviction
        self._keep(k, state)
        if fresh:
            self.fresh.add(k)
        self._evict()

    def pop(self, client_id: int) -> Tensors | None:
        """Remove the client and return its state (None if it has none)."""
        state = self.get(client_id)
        self._forget(int(client_id), keep_file=False)
        return state

    def clear(self) -> None:
        """Forget every client (their files too)."""
        for k in list(self.memory.keys() | self.on_disk.keys()):
            self._forget(k, keep_file=False)

    def take_counts(self) -> tuple[int, int]:
        """(bytes spilled, bytes read back) since the last call; the counters restart."""
        counts = (self.spilled_bytes, self.read_bytes)
        self.spilled_bytes = self.read_bytes = 0
        return counts

    def close(self) -> None:
        """Forget everything and remove the spill folder."""
        self.memory.clear()
        self.memory_bytes = 0
        self.on_disk.clear()
        self.clean.clear()
        self.fresh.clear()
        if self._finalizer is not None:
            self._finalizer()
        self.root = None

    # ------------------------------------------------------------ internals
    def _keep(self, k: int, state: Tensors) -> None:
        self.memory[k] = state
        self.memory_bytes += nbytes(state)

    def _forget(self, k: int, keep_file: bool) -> None:
        state = self.memory.pop(k, None)
        if state is not None:
            self.memory_bytes -= nbytes(state)
        self.clean.discard(k)
        self.fresh.discard(k)
        if not keep_file and self.on_disk.pop(k, None) is not None:
            self._path(k).unlink(missing_ok=True)

    def _evict(self) -> None:
        """Spill least recently used states until the budget holds (the newest always stays)."""
        if not self.budget:
            return
        while self.memory_bytes > self.budget and len(self.memory) > 1:
            k, state = self.memory.popitem(last=False)
            self.memory_bytes -= nbytes(state)
            if k in self.fresh:  # drawn again from (seed, client) when next needed
                self.fresh.discard(k)
                continue
            if k in self.clean:  # its file is still current
                self.clean.discard(k)
                continue
            blob = save_bytes({n: t.detach().to("cpu").contiguous() for n, t in state.items()})
            path = self._path(k)
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(blob)
            self.on_disk[k] = _digest(blob)
            self.spilled_bytes += len(blob)

    def _read(self, k: int) -> Tensors:
        path = self._path(k)
        try:
            blob = path.read_bytes()
        except OSError as err:
            raise StateCorrupted(
                f"client {k}: its spilled personal state {path} cannot be read "
                f"({err.strerror or err}); the spill folder must stay in place while the run lasts"
            ) from err
        if _digest(blob) != self.on_disk[k]:
            raise StateCorrupted(
                f"client {k}: its spilled personal state {path} is corrupted (checksum "
                f"mismatch, {len(blob)} bytes); resume the run from its latest checkpoint"
            )
        try:
            state = load_bytes(blob)
        except SafetensorError as err:  # only if the digest matched a bad file: defensive
            raise StateCorrupted(f"client {k}: {path} is not a safetensors file: {err}") from err
        self.read_bytes += len(blob)
        return {n: t.to(self.device) for n, t in sorted(state.items())}

    def _path(self, k: int) -> Path:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="pf2lora-state-", dir=self._folder))
            self._finalizer = weakref.finalize(self, shutil.rmtree, self.root, True)
        # Sub-folders of 1,000 clients keep directories small at 100,000 clients.
        return self.root / f"{k // 1000:06d}" / f"{k}.safetensors"
