"""Inputs as they are, where they are: a data spec resolved to files, each opened as a (decompressed) stream.

A spec (``data.train`` / ``valid`` / ``test``, a predict input) is a path, a glob (``logs/dt=*/part-*.tsv.gz``),
a directory (every file below it, recursively), a URL that pyarrow's filesystems or fsspec understand
(``s3://``, ``gs://``, ``hdfs://``, ``file://``), or a list of these. Files come in sorted order of their full
name (per list entry, entries in the given order), so parts that concatenate to one file read as that file.

Text files ending in ``.gz``, ``.zst`` or ``.bz2`` are decompressed while they stream (never to disk, never
whole into memory). Folders named ``key=value`` below the spec's root (Hive partitions, as Spark and Flink
write them) become text columns of every row of the files inside.

An S3-compatible store's endpoint comes from ``data.s3_endpoint_url`` or the standard ``AWS_ENDPOINT_URL``;
credentials come from where the AWS SDK looks (environment, config files, instance roles) and are never part
of a file's name here, so they cannot reach a message, the cache key or the model directory.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from deepfm.data.readahead import ReadAhead
from deepfm.errors import DataError

COMPRESSION = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
WILDCARD = re.compile(r"[*?\[]")
_PARTITION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
# a stopped store should fail a read in seconds, not after the SDK's default of minutes of retries
S3_CONNECT_TIMEOUT_S, S3_REQUEST_TIMEOUT_S, S3_ATTEMPTS = 5.0, 30.0, 3
REMOTE_READ_BYTES, REMOTE_READ_AHEAD = 4 << 20, 3  # block size of a remote read, blocks fetched ahead


class Source(str):
    """One input file. As a string it is its name for messages: a local path, or a URL without credentials.

    ``fs`` / ``fs_path``: the pyarrow filesystem and path inside it (None for a local file, opened directly);
    ``partitions``: the Hive partition columns of its folders; ``size`` / ``mtime_ns`` as the store reports."""

    fs: pafs.FileSystem | None
    fs_path: str
    size: int
    mtime_ns: int | None
    partitions: dict[str, str]

    def __new__(cls, name: str, fs: pafs.FileSystem | None = None, fs_path: str | None = None, size: int = -1,
                mtime_ns: int | None = None, partitions: dict[str, str] | None = None) -> Source:
        obj = super().__new__(cls, name)
        obj.fs, obj.fs_path, obj.size, obj.mtime_ns = fs, fs_path or name, size, mtime_ns
        obj.partitions = dict(partitions or {})
        return obj

    @property
    def remote(self) -> bool:
        return self.fs is not None

    @property
    def compression(self) -> str | None:
        return compression_of(self)


def check_no_credentials(*specs: str | list[str] | None) -> None:
    """ValueError for a URL holding credentials (``s3://KEY:SECRET@bucket/...``): the config is kept in the model
    directory, so they must come from the environment."""
    for spec in (e for s in specs if s is not None for e in ([s] if isinstance(s, str) else s)):
        if is_url(spec) and "@" in urlsplit(spec).netloc:
            raise ValueError(f"credentials in a URL are not accepted ({display(spec)}): they would be kept in the "
                             "model directory; set them in the environment or ~/.aws/credentials")


def names_partition(column: str, *specs: str | list[str] | None) -> bool:
    """Whether a spec shows ``column`` as a partition folder (``logs/dt=*/``): then files need not hold it."""
    pattern = re.compile(rf"(^|[/\\]){re.escape(column)}=")
    return any(pattern.search(e) for s in specs if s is not None for e in ([s] if isinstance(s, str) else s))


def relative_to(spec: str | list | None, base: Path) -> str | list | None:
    """A data spec with its relative local paths read from ``base`` (URLs and absolute paths as they are)."""
    if isinstance(spec, list):
        return [relative_to(e, base) for e in spec]
    if isinstance(spec, str) and not is_url(spec) and not Path(spec).is_absolute():
        return str(base / spec)
    return spec


def compression_of(name: str) -> str | None:
    """The codec of a file from its extension (None: read as it is)."""
    return COMPRESSION.get(os.path.splitext(name)[1].lower())


def is_url(spec: str) -> bool:
    scheme = urlsplit(spec).scheme
    return len(scheme) > 1 and "://" in spec  # a Windows drive letter is no scheme


@dataclass(frozen=True)
class Store:
    """Where remote inputs are: the S3 endpoint (config key, else ``AWS_ENDPOINT_URL``, else AWS itself)."""

    s3_endpoint_url: str | None = None

    def endpoint(self) -> str | None:
        return self.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def filesystem(url: str, store: Store = Store()) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, name without credentials) of a URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    bucket = parts.hostname or ""
    name = f"{scheme}://{bucket}{parts.path}"  # userinfo (a key pasted into a URL) never reaches a name
    if scheme == "s3":
        endpoint = store.endpoint()
        # the SDK reads the environment's credentials when the filesystem is made: a changed key is a new one
        env = hashlib.sha256("\0".join(os.environ.get(k, "") for k in _CREDENTIAL_VARS).encode()).hexdigest()
        key = ("s3", endpoint, parts.username, parts.password, env)
        if key not in _FILESYSTEMS:
            _FILESYSTEMS[key] = _s3(endpoint, parts.username, parts.password)
        return _FILESYSTEMS[key], f"{bucket}{parts.path}", name
    key = (scheme, parts.netloc)
    if key not in _FILESYSTEMS:
        try:
            _FILESYSTEMS[key] = pafs.FileSystem.from_uri(url)[0]
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError):
            _FILESYSTEMS[key] = _fsspec(scheme, name)
    fs = _FILESYSTEMS[key]
    inner = f"{bucket}{parts.path}" if not isinstance(fs, pafs.LocalFileSystem) else parts.path
    return fs, inner, name


def _s3(endpoint: str | None, access_key: str | None, secret_key: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {"connect_timeout": S3_CONNECT_TIMEOUT_S, "request_timeout": S3_REQUEST_TIMEOUT_S,
                    "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)}
    if endpoint:
        ep = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=ep.netloc, scheme=ep.scheme)
        kwargs.setdefault("region", os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or
                          "us-east-1")
    if access_key and secret_key:
        kwargs.update(access_key=access_key, secret_key=secret_key)
    return pafs.S3FileSystem(**kwargs)


def _fsspec(scheme: str, name: str) -> pafs.FileSystem:
    try:
        import fsspec
    except ImportError:
        raise DataError(f"pyarrow has no filesystem for '{scheme}://' and fsspec is not installed "
                        "(pip install fsspec and its package for the scheme)", path=name) from None
    try:
        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
    except (ImportError, ValueError) as err:
        raise DataError(f"no filesystem for '{scheme}://': {err}", path=name) from None


def resolve(spec: str | list[str] | Source, store: Store = Store(), hint: str = "", what: str = "") -> list[Source]:
    """The files a spec names, in a stable order; ``DataError`` naming the entry that matches none (``what``
    the input is, ``hint`` where to fix it, for that message)."""
    if isinstance(spec, Source):
        return [spec]
    entries = [spec] if isinstance(spec, str) else list(spec)
    out: list[Source] = []
    for entry in entries:
        found = _resolve_remote(entry, store) if is_url(entry) and not entry.startswith("file://") else \
            _resolve_local(entry.removeprefix("file://"))
        if not found:
            pattern = WILDCARD.search(entry) or entry.endswith("/")
            missing = "no file matches" if pattern else f"{what + ' ' if what else ''}file not found"
            raise DataError(f"{missing}{f' ({hint})' if hint else ''}", path=display(entry))
        out.extend(found)
    return out


def display(spec: str) -> str:
    """A spec as messages show it: a URL without its credentials."""
    if not is_url(spec):
        return spec
    p = urlsplit(spec)
    return f"{p.scheme}://{p.hostname or ''}{':' + str(p.port) if p.port else ''}{p.path}"


def _root_of(pattern: str) -> str:
    """The folder above a glob's first wildcard: where its partition folders start."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if WILDCARD.search(part):
            return "/".join(parts[:i])
    return os.path.dirname(pattern)


def partitions_of(path: str, root: str) -> dict[str, str]:
    """The ``key=value`` folders of ``path`` below ``root``."""
    rel = os.path.relpath(os.path.dirname(path), root) if root else os.path.dirname(path)
    found = {}
    for part in rel.replace("\\", "/").split("/"):
        m = _PARTITION.match(part)
        if m:
            found[m[1]] = m[2]
    return found


def _hidden(name: str) -> bool:
    """Files Spark, Hadoop and editors leave beside the data (``_SUCCESS``, ``.crc``, ``.part-0.crc``)."""
    base = os.path.basename(name.rstrip("/"))
    return base.startswith((".", "_")) or base.endswith(".crc")


def _hidden_below(path: str, root: str) -> bool:
    return any(_hidden(p) for p in os.path.relpath(path, root or ".").replace(os.sep, "/").split("/"))


def _walk(folder: str) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]


def matches(pattern: str, path: str) -> bool:
    """Whether ``path`` is a file a glob names: the pattern matches it, or a folder above it, segment by
    segment (``*`` never crosses a ``/``, as for local globs)."""
    want, have = pattern.strip("/").split("/"), path.strip("/").split("/")
    return len(have) >= len(want) and all(fnmatch.fnmatchcase(h, w) for h, w in zip(have, want, strict=False))


def _resolve_local(entry: str) -> list[Source]:
    if os.path.isdir(entry):
        files = sorted(f for f in _walk(entry) if not _hidden_below(f, entry))
        root = entry
    elif WILDCARD.search(entry) and not os.path.exists(entry):
        root = _root_of(entry)
        files = sorted(f for m in glob.glob(entry) for f in (_walk(m) if os.path.isdir(m) else [m])
                       if os.path.isfile(f) and not _hidden_below(f, root))
    else:
        return [Source(entry, size=os.path.getsize(entry))] if os.path.isfile(entry) else []
    return [Source(f, size=os.path.getsize(f), partitions=partitions_of(f, root)) for f in files]


def _resolve_remote(entry: str, store: Store) -> list[Source]:
    fs, inner, name = filesystem(entry, store)
    prefix = name[: len(name) - len(inner)]  # "s3://"
    wild = WILDCARD.search(inner)
    base = _root_of(inner) if wild else inner
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File and not wild:
            return [Source(name, fs, inner, info.size, info.mtime_ns)]
        if info.type == pafs.FileType.NotFound:
            _check_bucket(fs, inner, entry)
            return []
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except OSError as err:
        raise DataError(store_error(err), path=display(entry)) from None
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)
    files = [i for i in files if not _hidden_below(i.path, base) and (not wild or matches(inner, i.path))]
    return [Source(prefix + i.path, fs, i.path, i.size, i.mtime_ns, partitions_of(i.path, base)) for i in files]


def _check_bucket(fs: pafs.FileSystem, inner: str, entry: str) -> None:
    """A spec that matches nothing in an object store: say so plainly when its bucket is what is missing."""
    bucket = inner.split("/", 1)[0]
    if isinstance(fs, pafs.S3FileSystem) and bucket and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
        raise DataError("the bucket does not exist", path=display(entry))


def store_error(err: BaseException) -> str:
    """An object store's error as one line: what went wrong, not the SDK's dump (never credentials: the SDK
    does not echo them, and only the first line is kept)."""
    text = str(err)
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or "no such bucket" in low:
        return "the bucket does not exist"
    if any(k in low for k in ("invalidaccesskeyid", "signaturedoesnotmatch", "access_denied", "accessdenied",
                              "forbidden", "invalid access key", "http status 403")):
        return ("access denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                "~/.aws/credentials or the instance role)")
    if any(k in low for k in ("connection refused", "couldn't connect", "could not connect", "curl error",
                              "network", "timed out", "timeout", "connection reset", "unexpected end")):
        return "the store did not answer (is it running and is the endpoint right? data.s3_endpoint_url / " \
               "AWS_ENDPOINT_URL)"
    return f"the store failed: {text.splitlines()[0][:300] if text else type(err).__name__}"


def source(path: str) -> Source:
    """``path`` as a Source (a plain string may be a local path or a URL, resolved with the environment's store)."""
    if isinstance(path, Source):
        return path
    if is_url(path) and not path.startswith("file://"):
        fs, inner, name = filesystem(path)
        return Source(name, fs, inner)
    return Source(path.removeprefix("file://"))


def exists(path: str) -> bool:
    src = source(path)
    if not src.remote:
        return os.path.isfile(src)
    return src.fs.get_file_info(src.fs_path).type == pafs.FileType.File  # type: ignore[union-attr]


def size_of(path: str) -> int:
    """Bytes as stored (compressed, for a compressed file)."""
    src = source(path)
    if src.size >= 0:
        return src.size
    if not src.remote:
        return os.path.getsize(src)
    return src.fs.get_file_info(src.fs_path).size  # type: ignore[union-attr]


def needs_stream(path: str) -> bool:
    """Whether readers must read ``path`` through ``open_binary`` (remote or compressed) rather than by name."""
    src = source(path)
    return src.remote or src.compression is not None


def open_native(path: str) -> pa.NativeFile:
    """The file's bytes as an arrow stream (what arrow's CSV reader reads without Python in the loop),
    decompressed by extension."""
    src = source(path)
    codec = src.compression
    try:
        if src.remote:
            # reads of a few MB (a decompressor's small reads would each be a request to the store), fetched
            # ahead by a thread so that neither the decompressor nor the parser waits for one (readahead.py)
            stream = src.fs.open_input_stream(src.fs_path, compression=None,  # type: ignore[union-attr]
                                              buffer_size=0)
            raw = pa.PythonFile(ReadAhead(stream, REMOTE_READ_BYTES, REMOTE_READ_AHEAD), mode="r")
            return raw if codec is None else pa.CompressedInputStream(raw, codec)
        raw = pa.OSFile(str(src))
        return raw if codec is None else pa.CompressedInputStream(raw, codec)
    except OSError as err:
        raise DataError(store_error(err) if src.remote else f"cannot open: {err}", path=str(src)) from None


def open_binary(path: str) -> io.BufferedIOBase:
    """The file's bytes as a buffered Python file (for line-by-line readers), decompressed by extension."""
    src = source(path)
    if not src.remote and src.compression is None:
        return open(src, "rb")  # noqa: SIM115
    return io.BufferedReader(open_native(src), buffer_size=1 << 20)  # type: ignore[arg-type]


def open_random_access(path: str) -> str | pa.NativeFile:
    """What a Parquet reader opens: the local path itself, or a random-access remote file."""
    src = source(path)
    if not src.remote:
        return str(src)
    try:
        return src.fs.open_input_file(src.fs_path)  # type: ignore[union-attr]
    except OSError as err:
        raise DataError(store_error(err), path=str(src)) from None


def stamp(path: str) -> dict:
    """What the cache key knows of a file: for a local one its size, mtime and a hash of its first and last MB;
    for a remote one what the store reports (size, modification time), so nothing is downloaded for it."""
    src = source(path)
    if src.remote:
        size = src.size
        mtime = src.mtime_ns
        if size < 0 or mtime is None:
            info = src.fs.get_file_info(src.fs_path)  # type: ignore[union-attr]
            size, mtime = info.size, info.mtime_ns
        return {"path": str(src), "size": size, "mtime_ns": mtime}
    st = os.stat(src)
    h = hashlib.sha256()
    with open(src, "rb") as fh:
        h.update(fh.read(1 << 20))
        if st.st_size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            h.update(fh.read(1 << 20))
    return {"path": os.path.abspath(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "head_tail_sha256": h.hexdigest()}
