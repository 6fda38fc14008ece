"""Where results live: one interface for a local folder and an object-store URI.

Every file a run, a tune, a report or an export reads or writes goes through a
:class:`Location`: a ``pyarrow.fs`` file system plus a path on it. ``location()``
turns what the user typed into one: a local path (``results/sst2``), a
``file://`` URI, or an object-store URI (``s3://bucket/run``, ``gs://bucket/run``).

Why ``pyarrow.fs`` (and not fsspec/s3fs): Ray's own ``storage_path`` goes through
it (Tune's ``RunConfig`` takes a ``storage_filesystem``), so Tune's folder and ours
use the same client and settings; pyarrow is already a dependency (Parquet)
and reads a Parquet dataset folder straight from a bucket; its S3 client reads
credentials and endpoint from the usual environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL``, instance roles), so none ever goes into a config or a result.
s3fs would add aiobotocore and a second way of opening files.

Atomic writes: a local file is written under a hidden temporary name in its
folder and renamed into place; an object is PUT whole under its final name
(S3 and GCS make an object visible only when its upload completes), so no
reader ever sees half a file. Parquet readers skip hidden names.

Errors: a URI whose server cannot be reached, a bucket that does not exist, or
a local path that is a file where a folder is expected raise
:class:`StorageError` with one line naming the location.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

URI_SCHEMES = ("s3", "gs", "gcs", "file")


class StorageError(ValueError):
    """A location cannot be used: unreachable server, missing bucket, file for a folder."""


def is_uri(text: str | os.PathLike) -> bool:
    """Whether ``text`` is a URI with one of :data:`URI_SCHEMES` (else a local path)."""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme.lower() in URI_SCHEMES


def location(where: str | os.PathLike | Location) -> Location:
    """The :class:`Location` of a local path or a URI (see the module docstring).

    Raises:
        StorageError: an unknown scheme, or a URI that ``pyarrow.fs`` cannot resolve.
    """
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    scheme, sep, _ = text.partition("://")
    if not sep:
        return Location(pafs.LocalFileSystem(), str(Path(text).absolute()), text)
    if scheme.lower() not in URI_SCHEMES:
        raise StorageError(
            f"{text}: unknown scheme {scheme!r}; use a local path or one of "
            f"{[f'{s}://' for s in URI_SCHEMES]}"
        )
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (OSError, ValueError) as err:
        raise StorageError(f"{text}: cannot open this URI: {_first_line(err)}") from err
    return Location(fs, path.rstrip("/"), text.rstrip("/"))


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


@dataclass(frozen=True)
class Location:
    """A file or folder on a ``pyarrow.fs`` file system, with the pathlib calls the project uses.

    Attributes:
        fs: the file system (local, S3, GCS).
        path: the path on ``fs`` (``bucket/key`` on object stores, absolute locally).
        uri: how the user named it; printed in messages and used to rebuild it
            on another node (``location(loc.uri)`` reads that node's credentials).
    """

    fs: pafs.FileSystem
    path: str
    uri: str

    # ------------------------------------------------------------ names
    def __truediv__(self, name: str | os.PathLike) -> Location:
        name = os.fspath(name).strip("/")
        return Location(
            self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.uri.rstrip('/')}/{name}"
        )

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        """Local locations act as paths (``open``, ``pd.read_parquet``); URIs do not."""
        return str(self.local)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        path, uri = self.path.rstrip("/").rsplit("/", 1)[0], self.uri.rstrip("/").rsplit("/", 1)[0]
        return Location(self.fs, path or "/", uri or "/")

    @property
    def portable(self) -> str:
        """A name that means this location in any process: an absolute local path, or the URI."""
        return self.path if self.is_local else self.uri

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local(self) -> Path:
        """The local path (only for local locations)."""
        if not self.is_local:
            raise StorageError(f"{self.uri}: not a local path")
        return Path(self.path)

    # ------------------------------------------------------------ queries
    def info(self) -> pafs.FileInfo:
        """The file system's record of this path (``type`` NotFound when absent).

        Raises:
            StorageError: the store cannot be reached or refuses the request.
        """
        return self._call("read", self.fs.get_file_info, self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def iterdir(self) -> list[Location]:
        """The direct children, sorted by name (empty when the folder does not exist)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True)
        infos = self._call("list", self.fs.get_file_info, selector)
        return [self / info.base_name for info in sorted(infos, key=lambda i: i.base_name)]

    def rglob(self, name: str) -> list[Location]:
        """Every file called ``name`` at any depth below this folder, sorted by path."""
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        infos = self._call("list", self.fs.get_file_info, selector)
        found = sorted(
            i.path for i in infos if i.base_name == name and i.type == pafs.FileType.File
        )
        return [self / self.relative(path) for path in found]

    def relative(self, path: str) -> str:
        """``path`` (a path on this file system below this folder) relative to this folder."""
        return path[len(self.path) :].strip("/")

    def glob(self, prefix: str = "", suffix: str = "") -> list[Location]:
        """Children whose name starts with ``prefix`` and ends with ``suffix``."""
        return [c for c in self.iterdir() if c.name.startswith(prefix) and c.name.endswith(suffix)]

    # ------------------------------------------------------------ reading
    def read_bytes(self) -> bytes:
        """The file's bytes. Raises FileNotFoundError when absent, StorageError if unreachable."""
        if self.is_local:
            return self.local.read_bytes()
        if not self.is_file():
            raise FileNotFoundError(2, "No such file", self.uri)
        with self._call("read", self.fs.open_input_stream, self.path) as stream:
            return stream.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_parquet(self) -> pd.DataFrame:
        """This Parquet file or dataset folder of part files as one DataFrame.

        Raises:
            FileNotFoundError: nothing is there.
            StorageError: the store cannot be reached, or the file is not Parquet /
                the parts do not share a schema (damaged results), named.
        """
        if not self.exists():
            raise FileNotFoundError(2, "No such file or folder", self.uri)
        try:
            return pq.read_table(self.path, filesystem=self.fs).to_pandas()
        except (pa.ArrowException, OSError) as err:
            raise StorageError(f"{self.uri}: not readable as Parquet: {_first_line(err)}") from err

    @contextlib.contextmanager
    def local_file(self) -> Iterator[Path]:
        """A local path holding this file: itself, or a temporary download removed afterwards."""
        if self.is_local:
            yield self.local
            return
        with tempfile.TemporaryDirectory(prefix="pf2lora-") as tmp:
            dest = Path(tmp) / self.name
            dest.write_bytes(self.read_bytes())
            yield dest

    def download(self, dest: Path) -> Path:
        """Copy this folder (recursively) into the local folder ``dest``; returns ``dest``."""
        dest.mkdir(parents=True, exist_ok=True)
        self._call(
            "read",
            pafs.copy_files,
            self.path,
            str(dest),
            source_filesystem=self.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        return dest

    # ------------------------------------------------------------ writing
    def mkdir(self) -> None:
        """Create the folder (locally; an object store has folders only as key prefixes).

        Raises:
            StorageError: a file sits where a folder (or one of its parents) is expected.
        """
        if self.is_local:
            try:
                self.local.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError) as err:
                raise StorageError(f"{self.uri}: a file is in the way of this folder") from err

    def write_with(self, write: Callable[[Path], object]) -> None:
        """Atomically make this file the one ``write(tmp_path)`` writes to a local temp path."""
        if self.is_local:
            self.parent.mkdir()
            fd, tmp = tempfile.mkstemp(dir=self.parent.path, prefix=f".{self.name}.", suffix=".tmp")
            os.close(fd)
            try:
                write(Path(tmp))
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
                os.replace(tmp, self.path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return
        with tempfile.TemporaryDirectory(prefix="pf2lora-") as tmp:
            file = Path(tmp) / self.name
            write(file)
            with (
                file.open("rb") as src,
                self._call("write", self.fs.open_output_stream, self.path) as dst,
            ):
                shutil.copyfileobj(src, dst, 8 << 20)

    def write_bytes(self, data: bytes) -> None:
        """Atomically replace this file's content (see the module docstring)."""
        if self.is_local:
            self.write_with(lambda tmp: tmp.write_bytes(data))
            return
        with self._call("write", self.fs.open_output_stream, self.path) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def delete(self) -> None:
        """Remove this file, or this folder and everything in it; absent is fine."""
        kind = self.info().type
        if kind == pafs.FileType.Directory:
            self._call("delete", self.fs.delete_dir, self.path)
        elif kind == pafs.FileType.File:
            self._call("delete", self.fs.delete_file, self.path)

    # ------------------------------------------------------------ errors
    def _call(self, what: str, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except (NotADirectoryError, IsADirectoryError) as err:
            raise StorageError(
                f"{self.uri}: a file is where a folder is expected, or the "
                f"reverse ({_first_line(err)})"
            ) from err
        except OSError as err:
            raise StorageError(f"{self.uri}: cannot {what}: {_first_line(err)}") from err


def cached_copy(loc: Location) -> Path:
    """A local copy of the remote file ``loc`` (kept in a per-user cache; local files as is).

    Every process that needs the file (each Ray actor on each node) calls this;
    the first one on a machine downloads it under a temporary name and renames
    it into place, the others reuse it while its size matches the remote one.
    """
    if loc.is_local:
        return loc.local
    import hashlib

    info = loc.info()
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(2, "No such file", loc.uri)
    key = hashlib.sha256(loc.uri.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("PF2LORA_CACHE", Path(tempfile.gettempdir()) / "pf2lora-cache"))
    dest = cache / key / loc.name
    if dest.is_file() and dest.stat().st_size == info.size:
        return dest
    location(dest).write_bytes(loc.read_bytes())
    return dest


def check_folder(loc: Location, what: str) -> None:
    """Check that ``loc`` can be a folder and its store answers, writing nothing.

    Locally: no file sits at ``loc`` or at any of its parents. On an object
    store: the server answers and the bucket exists.

    Raises:
        StorageError: naming ``what`` (e.g. ``--out``) and the location.
    """
    if loc.is_local:
        for p in [loc.local, *loc.local.parents]:
            if p.exists():
                if not p.is_dir():
                    raise StorageError(
                        f"{what} {loc.uri} cannot be written: {p} is a file, not a folder"
                    )
                return
        return
    bucket = loc.path.split("/", 1)[0]
    try:
        found = Location(loc.fs, bucket, bucket).exists()
        is_file = found and loc.is_file()
    except StorageError as err:
        reason = _first_line(err.__cause__) if err.__cause__ else str(err)
        raise StorageError(f"{what} {loc.uri}: cannot reach its store: {reason}") from err
    if not found:
        raise StorageError(
            f"{what} {loc.uri}: bucket {bucket!r} does not exist (or these credentials cannot "
            "see it)"
        )
    if is_file:
        raise StorageError(f"{what} {loc.uri}: an object is there, not a folder")
