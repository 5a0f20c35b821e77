"""Waiting out an object-store outage: bounded retries with backoff, and a run storage that retries by itself.

An operation that fails because the store is unreachable (connection refused or reset, time-outs, 5xx "slow
down / unavailable", an upload session the store lost when it restarted) is retried with exponential backoff
for up to `STORAGE_RETRY_SECONDS`, with a warning per retry, then fails with `StorageUnreachable`. Anything
else (wrong credentials, a missing bucket, a missing file) is raised at once, so a misconfiguration still fails
fast.

`patient_filesystem` wraps a run's storage filesystem so that every call on it waits out an outage, Ray
Train's own calls included: its controller writes a snapshot of the run's checkpoints to storage whenever it
registers one, and one failed write ends the whole run (a controller error is not retried by `max_failures`).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

import pyarrow
import pyarrow.fs

from rayapp.data.storage import StorageError

logger = logging.getLogger(__name__)

# How long storage may stay unreachable before a run fails. Object stores come back from restarts and network
# partitions within minutes; Ray Train's own restarts would instead burn `max_failures` within seconds.
STORAGE_RETRY_SECONDS = 300.0
FIRST_RETRY_DELAY_S, MAX_RETRY_DELAY_S = 1.0, 20.0
# pyarrow / AWS SDK error texts of a store that is away or overloaded (not of one that refuses the request)
_UNREACHABLE_MARKERS = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't connect",
                        "Connection refused", "Connection reset", "connection was reset", "timed out",
                        "REQUEST_TIMEOUT", "SERVICE_UNAVAILABLE", "ServiceUnavailable", "SLOW_DOWN", "SlowDown",
                        "INTERNAL_FAILURE", "InternalError", "NO_SUCH_UPLOAD", "NoSuchUpload")
_SPOOL_BYTES = 64 * 1024 * 1024  # an output stream's buffer stays in memory up to this size, then on local disk

T = TypeVar("T")


class StorageUnreachable(StorageError):
    """Storage stayed unreachable for the whole retry budget."""


def storage_unreachable(err: BaseException) -> bool:
    """True for an error that says the store is away or overloaded (worth waiting for), not that it refused."""
    if isinstance(err, (FileNotFoundError, StorageUnreachable)):  # the latter: an inner retry already gave up
        return False
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    return isinstance(err, OSError) and any(marker in str(err) for marker in _UNREACHABLE_MARKERS)


def retry_delays(total_s: float) -> list[float]:
    """The waits between attempts: doubling from FIRST_RETRY_DELAY_S, at most MAX_RETRY_DELAY_S, `total_s` in all."""
    delays: list[float] = []
    delay = FIRST_RETRY_DELAY_S
    while sum(delays) < total_s:
        delays.append(min(delay, total_s - sum(delays)))
        delay = min(2 * delay, MAX_RETRY_DELAY_S)
    return delays


def with_storage_retries(what: str, operation: Callable[[], T], *, retry_seconds: float | None = None) -> T:
    """`operation()`, retried while the storage is unreachable; `what` names it in the log lines and the final
    error, e.g. "uploading s3://bucket/run/checkpoint_x/file". Gives up once `retry_seconds` (default
    STORAGE_RETRY_SECONDS) have passed since the first failure."""
    delays = retry_delays(STORAGE_RETRY_SECONDS if retry_seconds is None else retry_seconds)
    attempts = len(delays) + 1
    first_failure = None
    for attempt in range(1, attempts + 1):
        try:
            return operation()
        except OSError as err:
            if not storage_unreachable(err):
                raise
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if attempt == attempts or now - first_failure >= sum(delays):
                raise StorageUnreachable(f"storage unreachable while {what}: gave up after {attempt} attempts over "
                                         f"{now - first_failure:.0f} s: {err}") from err
            delay = delays[attempt - 1]
            logger.warning("storage unreachable while %s, retrying in %.0fs (attempt %d/%d): %s", what, delay,
                           attempt, attempts, str(err).splitlines()[0][:300])
            time.sleep(delay)
    raise AssertionError("not reached: the last attempt returns or raises")


def display(filesystem, path: str) -> str:
    """`path` on `filesystem` as a user would write it (a URI for object stores), for log lines and errors."""
    scheme = getattr(filesystem, "type_name", "local").removeprefix("py::")
    return path if scheme == "local" else f"{scheme}://{path.lstrip('/')}"


def patient_filesystem(filesystem, retry_seconds: float | None = None):
    """`filesystem` behind a pyarrow `PyFileSystem` whose every call waits out an outage (see the module doc)."""
    return pyarrow.fs.PyFileSystem(PatientHandler(filesystem, retry_seconds))


def unwrap(filesystem):
    """The filesystem inside a `patient_filesystem`, else `filesystem` itself."""
    handler = getattr(filesystem, "handler", None)
    return handler.inner if isinstance(handler, PatientHandler) else filesystem


class _UploadOnClose:
    """A write stream buffered locally and uploaded whole, with retries, when closed: an object store shows an
    object only once its upload completed, and a store that restarted has lost the upload session anyway."""

    def __init__(self, handler: PatientHandler, path: str, metadata):
        self.handler, self.path, self.metadata = handler, path, metadata
        self.buffer = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115 - closed in close()
        self.closed = False

    def write(self, data) -> int:
        return self.buffer.write(data)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.buffer.tell()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.handler.upload(self.buffer, self.path, self.metadata)
        finally:
            self.buffer.close()


class PatientHandler(pyarrow.fs.FileSystemHandler):
    """A pyarrow `FileSystemHandler` that forwards to `inner`, retrying while it is unreachable."""

    def __init__(self, inner, retry_seconds: float | None = None):
        self.inner, self.retry_seconds = inner, retry_seconds

    def _retry(self, what: str, path: str, operation: Callable[[], T]) -> T:
        return with_storage_retries(f"{what} {display(self.inner, path)}", operation, retry_seconds=self.retry_seconds)

    def __eq__(self, other) -> bool:  # Ray Train compares a checkpoint's filesystem with the run's storage's
        return isinstance(other, PatientHandler) and other.inner.equals(self.inner)

    def __hash__(self) -> int:
        return hash(self.inner.type_name)

    def get_type_name(self) -> str:
        return self.inner.type_name

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths):
        return self._retry("reading", paths[0] if paths else "", lambda: self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._retry("listing", selector.base_dir, lambda: self.inner.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._retry("creating", path, lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._retry("deleting", path, lambda: self.inner.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._retry("deleting", path, lambda: self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        self._retry("deleting", "/", lambda: self.inner.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path: str) -> None:
        self._retry("deleting", path, lambda: self.inner.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._retry("moving", src, lambda: self.inner.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._retry("copying", src, lambda: self.inner.copy_file(src, dest))

    def open_input_stream(self, path: str):
        # Opening waits out an outage; a read cut off later raises, and callers that can start over do
        # (checkpoint restore retries its whole download).
        return self._retry("reading", path, lambda: self.inner.open_input_stream(path))

    def open_input_file(self, path: str):
        return self._retry("reading", path, lambda: self.inner.open_input_file(path))

    def open_output_stream(self, path: str, metadata):
        return pyarrow.PythonFile(_UploadOnClose(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata):
        return self._retry("appending to", path, lambda: self.inner.open_append_stream(path, metadata=metadata))

    def upload(self, buffer, path: str, metadata) -> None:
        """The content of `buffer` (a local file object) to `path`, whole, retried."""

        def put() -> None:
            buffer.seek(0)
            with self.inner.open_output_stream(path, metadata=metadata) as out:
                shutil.copyfileobj(buffer, out, 8 * 1024 * 1024)

        self._retry("writing", path, put)
