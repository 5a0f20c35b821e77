"""THE URI and cache module: every local path or URI rayapp reads or writes (data, runtime, serve, jobs) goes
through these rules.

What counts as a URI (`is_uri`): text that starts with `scheme://`, the scheme being a letter followed by at
least one more of `[A-Za-z0-9+.-]` (so a Windows drive `C://` is a path). Anything else (`runs/rm/model`,
`ImageReward-v1.0`, `CLIP:tiny`) is a local path or a name. `is_remote`: a URI other than `file://`, whose
files are not on this node's disk.

What each scheme can do:
- a local path and `file://` -> `pyarrow.fs.LocalFileSystem` (read, list, write; `local_path` copies nothing);
- `s3://` (`s3a://`), `gs://`, `abfs://`, `hdfs://` -> pyarrow's own filesystem (read, list, write);
- any other scheme fsspec knows (with its package installed: `hf://` through huggingface_hub, `gcsfs`,
  `adlfs`, ...) -> fsspec wrapped for pyarrow;
- `http://` / `https://` name ONE file: `local_path` downloads it (model weights, an ImageReward.pt), but
  `resolve` refuses them with a clear error, since HTTP cannot list or write a directory (data, shards,
  outputs, checkpoints need an object store URI or a local path).

Local copies (`local_path`, `local_dir`): one cache for the whole package, under `cache_root()` =
`$RAYAPP_CACHE`, else `$XDG_CACHE_HOME/rayapp`, else `~/.cache/rayapp`. An entry is `uri/<sha256 of the URI>/`
holding the file or directory under its own name and a `.complete` marker. It is filled in a temporary
sibling directory and renamed into place after the marker is written, under a per-entry file lock: a copy cut
off half-way is never used (an entry without its marker is deleted and fetched again), and concurrent processes
(two Serve replicas loading the same model) fetch once and share the result. `hf://owner/repo[/path]` is
fetched by huggingface_hub into its own cache (already atomic and shared, honouring HF_HUB_CACHE and
HF_HUB_OFFLINE) instead. Where a model is named (`rayapp.load`, scorer specs), a bare repo id
`owner/repo[/path]` that is not an existing local path means `hf://owner/repo[/path]` (`hub_uri`).

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
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
CACHE_ENV = "RAYAPP_CACHE"
COMPLETE_MARKER = ".complete"
HTTP_SCHEMES = ("http", "https")

# a scheme of two or more characters: one letter alone is a Windows drive (C://x)
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
# pyarrow error texts (AWS SDK error names) that mean "your credentials are wrong"
_AUTH_MARKERS = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch", "AccessDenied", "403", "EXPIRED_TOKEN", "UNRECOGNIZED_CLIENT")
# a hub repo id and an optional path inside it: owner/name[/dir...] (letters, digits, - _ .)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.+-]+)*/?$")
_NO_BUCKET_MARKERS = ("NO_SUCH_BUCKET", "NoSuchBucket", "Bucket '", "bucket does not exist")


class StorageError(OSError):
    """An object store refused a request (credentials, missing bucket); the message names the URI."""


def scheme(path: str | os.PathLike) -> str:
    """The URI scheme in lower case ("s3", "file", "https", ...); "" for a local path or a name."""
    match = _SCHEME.match(os.fspath(path))
    return match.group(1).lower() if match else ""


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...`, `file://` and `http(s)://` included (see the module docstring)."""
    return bool(scheme(path))


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URI whose files are not on this node's disk (every scheme but `file://`)."""
    return scheme(path) not in ("", "file")


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
    kind = scheme(text)
    if kind in HTTP_SCHEMES:
        raise StorageError(f"{text}: an {kind}:// URL names one file to download (model weights: give it as a "
                           f"scorer source), not a directory that can be listed or written; data, outputs and "
                           f"checkpoints need a local path or an object store URI (s3://, gs://, abfs://, ...)")
    if kind in ("s3", "s3a") and "?" not in text and _env("AWS_ACCESS_KEY_ID") and _env("AWS_SECRET_ACCESS_KEY"):
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
                           f"package for {kind}:// (pip install 'rayapp[storage]')") from native_error
    try:
        fs, inner = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as err:
        raise StorageError(f"{text}: no filesystem for {kind}:// ({err}); install its fsspec package "
                           f"(e.g. gcsfs for gs://, adlfs for abfs://)") from err
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner.rstrip("/") or inner


def display(filesystem, inner: str, like: str | os.PathLike) -> str:
    """The user-facing name of `inner` on `filesystem`: a URI when `like` was one, else the local path."""
    text = os.fspath(like)
    if not is_uri(text):
        return inner
    if not is_remote(text):
        return f"file://{inner}"  # inner is an absolute local path: file:///abs/path
    return f"{_SCHEME.match(text).group(1)}://{inner.lstrip('/')}"


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
    if not files and is_remote(path):
        _check_bucket(filesystem, inner, path)
    if not files and not missing_ok:
        kind = "/".join(f"*{s}" for s in suffixes) if suffixes else "files"
        if info.type == pafs.FileType.NotFound and not is_remote(path):
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
        if not is_remote(path):
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


# ------------------------------------------------------------------------------------------- local copies
def cache_root() -> Path:
    """Where local copies of URIs live: `$RAYAPP_CACHE`, else `$XDG_CACHE_HOME/rayapp`, else ~/.cache/rayapp."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rayapp"


def _key(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:32]


@contextmanager
def _locked(name: str) -> Iterator[bool]:
    """Hold the cache's exclusive lock `name` (one fetch of a thing at a time, across processes on this node);
    yields False where the filesystem has no locks (the atomic rename still keeps entries whole there)."""
    import fcntl

    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{_key(name)}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            held = True
        except OSError:
            held = False
        yield held  # the lock goes with the file handle, also when this process dies


def _name_of(inner: str) -> str:
    return posixpath.basename(inner.rstrip("/")) or "root"


def _remove_tree(path: Path) -> None:
    """Delete `path` (file or tree) after renaming it aside, so no reader sees it half-deleted."""
    import shutil
    import tempfile

    if not os.path.lexists(path):
        return
    aside = tempfile.mkdtemp(prefix=f".{path.name}.stale-", dir=path.parent)
    try:
        os.rename(path, os.path.join(aside, "x"))
    except FileNotFoundError:  # gone meanwhile (only possible without the lock)
        pass
    shutil.rmtree(aside, ignore_errors=True)


def _cached(uri: str, name: str, fill: Callable[[Path], None]) -> str:
    """`<entry>/<name>` of `uri`'s cache entry, made once by `fill(destination)` (see the module docstring)."""
    import shutil
    import tempfile

    entries = cache_root() / "uri"
    key = _key(uri)
    entry = entries / key
    if (entry / COMPLETE_MARKER).is_file():
        return os.fspath(entry / name)
    entries.mkdir(parents=True, exist_ok=True)
    with _locked(uri) as held:
        if (entry / COMPLETE_MARKER).is_file():  # another process fetched it while this one waited
            return os.fspath(entry / name)
        _remove_tree(entry)  # a copy without its marker was cut off: never used, fetched again
        for stale in entries.glob(f".{key}.partial-*") if held else ():  # left by a fetch that died
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.partial-", dir=entries))
        try:
            fill(staging / name)
            (staging / COMPLETE_MARKER).write_text(uri)
            os.rename(staging, entry)
        except OSError:
            if not (entry / COMPLETE_MARKER).is_file():  # not "another process (without a lock) won"
                shutil.rmtree(staging, ignore_errors=True)
                raise
            shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return os.fspath(entry / name)


def _http_get(url: str, destination: str | os.PathLike) -> None:
    """Stream one URL into `destination`; a body shorter than its Content-Length is an error, not a file."""
    import urllib.request

    written = 0
    with urllib.request.urlopen(url) as response, open(destination, "wb") as out:
        expected = response.headers.get("Content-Length")
        while chunk := response.read(1 << 20):
            out.write(chunk)
            written += len(chunk)
    if expected is not None and written != int(expected):
        raise OSError(f"{url}: the download stopped after {written} of {expected} bytes")


def download_file(url: str, target: str | os.PathLike) -> Path:
    """The http(s) file `url` at `target` (a fixed place, such as the reference's ~/.cache/ImageReward), fetched
    once: into a temporary sibling renamed on completion, one process at a time."""
    import tempfile

    target = Path(target).expanduser()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(os.fspath(target.resolve())):
        if target.is_file():
            return target
        handle, partial = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
        os.close(handle)
        try:
            _http_get(url, partial)
            os.replace(partial, target)
        except BaseException:
            os.unlink(partial)
            raise
    return target


def hub_uri(text: str | os.PathLike) -> str | None:
    """`hf://owner/repo[/path]` for a Hugging Face repo id `owner/repo[/path]` that is not an existing local path;
    None for anything else (a path, a URI, a bare name)."""
    text = os.fspath(text)
    if is_uri(text) or text.startswith(("/", ".", "~")) or os.path.exists(text) or not _REPO_ID.match(text):
        return None
    if any(part in ("", ".", "..") for part in text.rstrip("/").split("/")):
        return None
    return "hf://" + text.rstrip("/")


def _hf_local(uri: str) -> str:
    """`hf://owner/repo[/path]` from huggingface_hub's cache (a file, a directory, or the whole repo); offline
    (HF_HUB_OFFLINE=1 or no network) the cached snapshot of `main` is used."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    owner, _, rest = uri[len("hf://"):].partition("/")
    repo, _, inside = rest.partition("/")
    inside = inside.strip("/")
    if not owner or not repo:
        raise ValueError(f"{uri}: expected hf://owner/repo[/path]")
    try:
        local = Path(snapshot_download(repo_id=f"{owner}/{repo}",
                                       allow_patterns=[inside, f"{inside}/*"] if inside else None))
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{uri}: the hub repo {owner}/{repo} is not in the Hugging Face cache (HF_HUB_CACHE / HF_HOME) and "
            f"cannot be downloaded (no network, or HF_HUB_OFFLINE is set); run once online ({err})") from err
    except HfHubHTTPError as err:  # no such repo, gated, private without a token, ...
        raise OSError(f"{uri}: the hub refused {owner}/{repo}: {err}") from err
    found = local / inside if inside else local
    if not found.exists():
        raise FileNotFoundError(f"{uri}: no {inside!r} in the hub repo {owner}/{repo}")
    return os.fspath(found)


def local_path(path: str | os.PathLike, *, via=None) -> str:
    """A path on this node holding `path`'s file or directory: `path` itself when local (or `file://`), else
    the cache's copy (fetched on first use; see the module docstring).

    `via=(filesystem, inner path)` copies through a filesystem made elsewhere (the driver's, with its
    credentials) instead of resolving `path` here.
    """
    import pyarrow.fs as pafs

    text = os.fspath(path)
    kind = scheme(text)
    if not kind:
        return os.path.abspath(os.path.expanduser(text))
    if kind == "file":
        return resolve(text)[1]
    if kind == "hf":
        return _hf_local(text)
    if kind in HTTP_SCHEMES:
        name = _name_of(urlparse(text).path)
        return _cached(text, name, lambda destination: _http_get(text, destination))
    filesystem, inner = via if via is not None else resolve(text)

    def fill(destination: Path) -> None:
        with errors_named(text):
            info = filesystem.get_file_info(inner)
            if info.type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"{text} does not exist")
            if info.type == pafs.FileType.File:
                with filesystem.open_input_file(inner) as source, open(destination, "wb") as out:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
                return
            destination.mkdir()
            pafs.copy_files(inner, os.fspath(destination), source_filesystem=filesystem,
                            destination_filesystem=pafs.LocalFileSystem())

    return _cached(text, _name_of(inner), fill)


def local_dir(path: str | os.PathLike, *, via=None) -> str:
    """`local_path` of a directory (for things that only load from disk, such as tokenizers)."""
    local = local_path(path, via=via)
    if not os.path.isdir(local):
        raise NotADirectoryError(f"{os.fspath(path)} is not a directory")
    return local
