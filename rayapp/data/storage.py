"""Local paths and object-store URIs behind one interface: pyarrow filesystems, listing, errors naming the URI.

Every data path of rayapp (shard dirs, converter input and output, batch-scoring input and output) goes
through `resolve(path) -> (filesystem, path inside it)`:
- a local path -> `pyarrow.fs.LocalFileSystem` and the absolute path;
- `s3://`, `gs://`, `abfs://`, `hdfs://`, `file://` -> pyarrow's own filesystem for the scheme;
- any other scheme fsspec knows (with its package installed: `gcsfs`, `adlfs`, ...) -> fsspec wrapped for
  pyarrow.

S3 credentials: when `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and optionally `AWS_SESSION_TOKEN`,
`AWS_ENDPOINT_URL[_S3]`, `AWS_REGION`) are set in the driver's environment, the filesystem is built with them
explicitly, so it carries them when Ray pickles it into read / write tasks on workers whose environment
lacks them. Without those variables, pyarrow's default chain (instance role, config files) runs on each
node. Options in the URI's query string (`s3://bucket/x?endpoint_override=...`) are pyarrow's and win.

Errors: wrong credentials and missing buckets raise `StorageError` (an `OSError`) naming the URI and what
to fix; a missing path raises `FileNotFoundError` naming it.
"""
from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)

# pyarrow error texts (AWS SDK error names) that mean "your credentials are wrong"
_AUTH_MARKERS = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch", "AccessDenied", "403", "EXPIRED_TOKEN", "UNRECOGNIZED_CLIENT")
_NO_BUCKET_MARKERS = ("NO_SUCH_BUCKET", "NoSuchBucket", "Bucket '", "bucket does not exist")


class StorageError(OSError):
    """An object store refused a request (credentials, missing bucket); the message names the URI."""


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (a Windows drive letter is not a scheme)."""
    text = os.fspath(path)
    scheme = urlparse(text).scheme
    return "://" in text and len(scheme) > 1


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` for local paths and URIs alike (URIs keep their `scheme://`)."""
    text = os.fspath(base)
    if not is_uri(text):
        return os.path.join(text, *parts)
    query = ""
    if "?" in text:
        text, query = text.split("?", 1)
        query = "?" + query
    return posixpath.join(text.rstrip("/"), *parts) + query


def _env(*names: str) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


def _s3_from_env(uri: str):
    """An S3FileSystem with the environment's credentials and endpoint set explicitly (pickles with them)."""
    import pyarrow.fs as pafs

    parsed = urlparse(uri)
    kwargs = {"access_key": _env("AWS_ACCESS_KEY_ID"), "secret_key": _env("AWS_SECRET_ACCESS_KEY")}
    token = _env("AWS_SESSION_TOKEN")
    if token:
        kwargs["session_token"] = token
    region = _env("AWS_REGION", "AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    endpoint = _env("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = urlparse(endpoint).scheme or "https"
    path = (parsed.netloc + parsed.path).rstrip("/")
    return pafs.S3FileSystem(**kwargs), path


def resolve(path: str | os.PathLike):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs as pafs

    text = os.fspath(path)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(text)
    scheme = urlparse(text).scheme.lower()
    if scheme in ("s3", "s3a") and "?" not in text and _env("AWS_ACCESS_KEY_ID") and _env("AWS_SECRET_ACCESS_KEY"):
        return _s3_from_env(text.replace("s3a://", "s3://", 1))
    try:
        filesystem, inner = pafs.FileSystem.from_uri(text)
        return filesystem, inner.rstrip("/") or inner
    except Exception as err:  # noqa: BLE001 -- pyarrow lacks the scheme (or its library): try fsspec
        native_error = err
    try:
        import fsspec
    except ImportError:
        raise StorageError(f"{text}: pyarrow cannot open this URI ({native_error}); install fsspec and the "
                           f"package for {scheme}:// (pip install 'rayapp[storage]')") from native_error
    try:
        fs, inner = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as err:
        raise StorageError(f"{text}: no filesystem for {scheme}:// ({err}); install its fsspec package "
                           f"(e.g. gcsfs for gs://, adlfs for abfs://)") from err
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner.rstrip("/") or inner


def display(filesystem, inner: str, like: str | os.PathLike) -> str:
    """The user-facing name of `inner` on `filesystem`: a URI when `like` was one, else the local path."""
    text = os.fspath(like)
    if not is_uri(text):
        return inner
    scheme = urlparse(text).scheme
    return f"{scheme}://{inner.lstrip('/')}"


def explain(err: BaseException, uri: str) -> BaseException:
    """Turn a filesystem error into one that names the URI and what to check; others pass through."""
    message = str(err)
    if isinstance(err, (FileNotFoundError, StorageError)):
        return err
    if any(marker in message for marker in _NO_BUCKET_MARKERS):
        bucket = urlparse(uri).netloc if is_uri(uri) else ""
        return StorageError(f"{uri}: the bucket {bucket!r} does not exist or is not visible to these "
                            f"credentials (create it, or fix the URI / endpoint): {message}")
    if any(marker in message for marker in _AUTH_MARKERS):
        return StorageError(f"{uri}: access denied - check the credentials (AWS_ACCESS_KEY_ID / "
                            f"AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or your profile) and the endpoint "
                            f"(AWS_ENDPOINT_URL): {message}")
    return err


@contextmanager
def errors_named(uri: str | os.PathLike) -> Iterator[None]:
    """Re-raise filesystem errors inside the block through `explain` (so they name `uri`)."""
    try:
        yield
    except OSError as err:
        better = explain(err, os.fspath(uri))
        if better is err:
            raise
        raise better from err


def file_type(path: str | os.PathLike) -> str:
    """"file", "dir" or "missing"."""
    import pyarrow.fs as pafs

    filesystem, inner = resolve(path)
    with errors_named(path):
        info = filesystem.get_file_info(inner)
    if info.type == pafs.FileType.File:
        return "file"
    if info.type == pafs.FileType.Directory:  # pyarrow's S3 / GCS report a prefix with objects as one
        return "dir"
    return "missing"


def list_files(path: str | os.PathLike, suffixes: tuple[str, ...] | None = PARQUET_SUFFIXES, *,
               missing_ok: bool = False, recursive: bool = True):
    """(filesystem, sorted inner paths) of the files under `path` ending in `suffixes` (None: all), or the file
    itself when `path` is one. Hidden files (`.name`, `_name`) are left out, as Parquet readers do."""
    import pyarrow.fs as pafs

    filesystem, inner = resolve(path)
    with errors_named(path):
        info = filesystem.get_file_info(inner)
        if info.type == pafs.FileType.File:
            return filesystem, [inner]
        try:
            infos = filesystem.get_file_info(pafs.FileSelector(inner, recursive=recursive, allow_not_found=True))
        except FileNotFoundError:
            infos = []
    files = sorted(
        i.path for i in infos
        if i.type == pafs.FileType.File
        and not any(part.startswith((".", "_")) for part in posixpath.relpath(i.path, inner).split("/"))
        and (suffixes is None or i.path.endswith(suffixes))
    )
    if not files and is_uri(path):
        _check_bucket(filesystem, inner, path)
    if not files and not missing_ok:
        kind = "/".join(f"*{s}" for s in suffixes) if suffixes else "files"
        if info.type == pafs.FileType.NotFound and not is_uri(path):
            raise FileNotFoundError(f"no file or directory at {os.fspath(path)}")
        raise FileNotFoundError(f"no {kind} under {os.fspath(path)}")
    return filesystem, files


def _check_bucket(filesystem, inner: str, path: str | os.PathLike) -> None:
    """Raise StorageError naming `path` when its bucket (the first path component) does not exist."""
    import pyarrow.fs as pafs

    bucket = inner.lstrip("/").split("/", 1)[0]
    with errors_named(path):
        missing = filesystem.get_file_info(bucket).type == pafs.FileType.NotFound
    if missing:
        raise StorageError(f"{os.fspath(path)}: the bucket {bucket!r} does not exist or is not visible to these "
                           f"credentials (create it, or fix the URI / endpoint)")


def list_entries(path: str | os.PathLike):
    """(filesystem, [(name, "file" | "dir", inner path)]) directly under `path`, sorted; [] when missing."""
    import pyarrow.fs as pafs

    filesystem, inner = resolve(path)
    with errors_named(path):
        infos = filesystem.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    kinds = {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}
    return filesystem, sorted((posixpath.basename(i.path.rstrip("/")), kinds[i.type], i.path)
                              for i in infos if i.type in kinds)


def parquet_files(path: str | os.PathLike) -> list[str]:
    """THE Parquet listing: the sorted `*.parquet` files of a shard dir (or the one file given), as local
    paths or full URIs (whatever `path` was)."""
    filesystem, files = list_files(path, PARQUET_SUFFIXES)
    return [display(filesystem, f, path) for f in files]


def open_parquet(path: str | os.PathLike):
    """`pyarrow.parquet.ParquetFile` for a local path or URI."""
    import pyarrow.parquet as pq

    filesystem, inner = resolve(path)
    with errors_named(path):
        return pq.ParquetFile(filesystem.open_input_file(inner))


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole content of one file (local or URI)."""
    filesystem, inner = resolve(path)
    with errors_named(path), filesystem.open_input_file(inner) as handle:
        return handle.read()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write one file (local or URI), creating parent directories."""
    filesystem, inner = resolve(path)
    with errors_named(path):
        filesystem.create_dir(posixpath.dirname(inner) if is_uri(path) else os.path.dirname(inner), recursive=True)
        with filesystem.open_output_stream(inner) as handle:
            handle.write(data)


def delete_file(path: str | os.PathLike) -> None:
    """Remove one file (local or URI)."""
    filesystem, inner = resolve(path)
    with errors_named(path):
        filesystem.delete_file(inner)


def ensure_writable_dir(path: str | os.PathLike) -> None:
    """Create `path` (a local dir, or check that a URI's bucket is reachable with these credentials)."""
    filesystem, inner = resolve(path)
    with errors_named(path):
        if not is_uri(path):
            os.makedirs(inner, exist_ok=True)
            return
        # the bucket must exist: asking about it surfaces missing buckets and bad credentials here, not
        # later inside a worker
        filesystem.get_file_info(inner)
    _check_bucket(filesystem, inner, path)


def delete_dir_contents(path: str | os.PathLike) -> None:
    """Remove everything under `path` (local dir or URI prefix); a missing one is fine."""
    filesystem, inner = resolve(path)
    with errors_named(path):
        filesystem.delete_dir_contents(inner, missing_dir_ok=True)


def upload_dir(local_dir: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Copy a local directory tree to `destination` (local path or URI)."""
    import pyarrow.fs as pafs

    filesystem, inner = resolve(destination)
    with errors_named(destination):
        pafs.copy_files(os.path.abspath(os.fspath(local_dir)), inner, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=filesystem)


def download_dir(source: str | os.PathLike, local_dir: str | os.PathLike) -> str:
    """Copy a directory tree (local path or URI) to `local_dir`; returns `local_dir`."""
    import pyarrow.fs as pafs

    filesystem, inner = resolve(source)
    os.makedirs(local_dir, exist_ok=True)
    with errors_named(source):
        pafs.copy_files(inner, os.path.abspath(os.fspath(local_dir)), source_filesystem=filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
    return os.fspath(local_dir)


def local_dir(path: str | os.PathLike, cache_root: str | os.PathLike | None = None, *, via=None) -> str:
    """A local directory holding `path`'s files: `path` itself when local, else a downloaded copy.

    For things that only load from disk (tokenizers). Copies go under `cache_root` (default: a per-user
    temp dir keyed by the URI), reused when already there. `via=(filesystem, inner path)` downloads through
    a filesystem made elsewhere (the driver's, with its credentials) instead of resolving `path` here.
    """
    text = os.fspath(path)
    if not is_uri(text):
        return os.path.abspath(text)
    import hashlib
    import shutil
    import tempfile

    import pyarrow.fs as pafs

    root = cache_root or os.path.join(tempfile.gettempdir(), f"rayapp-cache-{os.getuid()}")
    target = os.path.join(root, hashlib.sha1(text.encode()).hexdigest()[:16])
    if not os.path.isdir(target) or not os.listdir(target):
        partial = f"{target}.partial-{os.getpid()}"
        if via is None:
            download_dir(text, partial)
        else:
            os.makedirs(partial, exist_ok=True)
            with errors_named(text):
                pafs.copy_files(via[1], partial, source_filesystem=via[0],
                                destination_filesystem=pafs.LocalFileSystem())
        try:
            os.replace(partial, target)
        except OSError:  # another process won the race; its copy is as good
            shutil.rmtree(partial, ignore_errors=True)
    return target
