"""A host's client data: built from the clients' rows when it needs them, dropped when not.

:class:`ClientDataCache` is what :class:`~pf2lora_ray.client.ClientHost` reads a
client's :class:`~pf2lora_ray.tasks.base.ClientData` from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pf2lora_ray.tasks.base import ClientRows


class ClientDataCache(dict):
    """Client id -> its data, built by the task (from its rows, or read or generated).

    Held for the whole run (the host's first clients' at build, any other
    client's on first use), or, ``on_demand``, only for the clients of the
    current call: :meth:`hold` then drops every other client's data, so memory
    holds one call's clients' data, not the population's.

    ``rows`` (the driver's, for the host's clients) are kept for as long as the
    host serves a client; the task builds from them and never draws the partition.
    With ``rows`` None the task draws it (or generates data from (seed, client)).
    """

    def __init__(
        self,
        task,
        client_ids: Sequence[int],
        on_demand: bool = False,
        rows: ClientRows | None = None,
    ) -> None:
        super().__init__()
        self.task, self.on_demand = task, on_demand
        self.rows = None if rows is None else {int(k): rows[k] for k in client_ids}
        if not on_demand:
            self.update(self._build(client_ids))

    def _build(self, client_ids: Sequence[int]) -> dict:
        if self.rows is None:
            return self.task.client_data(client_ids)
        unknown = [k for k in client_ids if k not in self.rows]
        if unknown:
            raise KeyError(f"client {unknown[0]}: this host was not given its rows")
        return self.task.client_data(client_ids, {k: self.rows[k] for k in client_ids})

    def __missing__(self, client_id: int):
        self[client_id] = self._build([client_id])[client_id]
        return self[client_id]

    def hold(self, client_ids: Sequence[int]) -> None:
        """Have the data of every client in ``client_ids`` (one task call for those missing).

        On demand, every other client's data is dropped first.
        """
        wanted = {int(k) for k in client_ids}
        if self.on_demand:
            for k in [k for k in self if k not in wanted]:
                del self[k]
        missing = sorted(wanted - self.keys())
        if missing:
            self.update(self._build(missing))

    def rows_of(self, client_ids: Sequence[int]) -> ClientRows | None:
        """The rows of ``client_ids`` (None when this host was given none)."""
        return None if self.rows is None else {int(k): self.rows[int(k)] for k in client_ids}

    def add_rows(self, rows: ClientRows | None) -> None:
        """Keep the rows of clients this host now serves."""
        if rows:
            self.rows = {} if self.rows is None else self.rows
            self.rows.update(rows)

    def drop(self, client_ids: Iterable[int]) -> None:
        """Forget clients this host no longer serves: their data and rows."""
        for k in client_ids:
            self.pop(k, None)
            if self.rows is not None:
                self.rows.pop(k, None)
