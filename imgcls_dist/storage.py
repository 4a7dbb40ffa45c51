"""One filesystem layer for every path a job takes: a local path, `s3://bucket/prefix` or `gs://bucket/prefix`.

Built on `pyarrow.fs`, the layer Ray Train and Ray Data use: `location()` makes a `Location` (filesystem,
path) with the operations the jobs need, `ray_storage` hands the same filesystem to Ray. Credentials and
endpoints come from the standard environment. Design: docs/design.md, "Storage".
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import IO, Any, Union

import pyarrow.fs as pafs

from imgcls_dist.errors import UserError

REMOTE_SCHEMES = ("s3", "gs")
_URI = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
# A wrong endpoint must fail in seconds, not minutes: connect timeout x the SDK's standard 3 attempts.
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0
_AWS_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                       "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")

PathLike = Union[str, os.PathLike, "Location"]


class StorageError(UserError):
    """A path that cannot be used: missing bucket, unreachable endpoint, no credentials, no such file."""


def is_uri(path: PathLike) -> bool:
    if isinstance(path, Location):
        return not path.is_local
    return bool(_URI.match(os.fspath(path) if isinstance(path, os.PathLike) else str(path)))


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _check_aws_credentials(uri: str) -> None:
    """Fail before any request when no credential source can exist: without one the SDK sends unsigned
    requests, and a store answers those with errors that do not say 'credentials'."""
    if any(os.environ.get(k) for k in _AWS_CREDENTIAL_ENV):
        return
    home = Path(os.environ.get("HOME", "~")).expanduser()
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE", home / ".aws" / "credentials"),
             os.environ.get("AWS_CONFIG_FILE", home / ".aws" / "config")]
    if any(Path(f).is_file() for f in files):
        return
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":  # so no instance role either
        raise StorageError(f"{uri}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                           "AWS_PROFILE, or run with an instance/pod role)")


@functools.lru_cache(maxsize=64)
def _s3_filesystem(bucket: str, endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    if region is None and endpoint is None:
        try:
            region = pafs.resolve_s3_region(bucket)
        except OSError:
            region = None  # unknown bucket or no network: the first real request reports it
    kwargs = dict(connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S)
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    return pafs.S3FileSystem(region=region or "us-east-1", **kwargs)


@functools.lru_cache(maxsize=8)
def _gcs_filesystem(emulator: str | None) -> pafs.FileSystem:
    if emulator:
        host = emulator.split("://", 1)[-1]
        return pafs.GcsFileSystem(endpoint_override=host, scheme="http", anonymous=True)
    return pafs.GcsFileSystem()


def filesystem_for(scheme: str, bucket: str, uri: str) -> pafs.FileSystem:
    if scheme == "s3":
        _check_aws_credentials(uri)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3_filesystem(bucket, _s3_endpoint(), region)
    if scheme == "gs":
        return _gcs_filesystem(os.environ.get("STORAGE_EMULATOR_HOST"))
    raise StorageError(f"{uri}: unsupported scheme {scheme}:// (use a local path, s3:// or gs://)")


def describe_error(uri: str, e: BaseException, scheme: str | None = None) -> str:
    """pyarrow/AWS SDK error text -> one line saying what is wrong with `uri`."""
    text = " ".join(str(e).split())
    bucket = uri.split("://", 1)[-1].split("/", 1)[0]
    if "NO_SUCH_BUCKET" in text or "bucket does not exist" in text.lower() or re.search(r"Bucket '.*' not found", text):
        return f"{uri}: bucket '{bucket}' does not exist"
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Couldn't connect" in text:
        where = (_s3_endpoint() or "the default AWS endpoint") if scheme == "s3" else "the storage endpoint"
        detail = re.search(r"curlCode: \d+, ([^;]+)", text)
        return f"{uri}: cannot reach {where} ({detail.group(1) if detail else 'connection failed'}; check AWS_ENDPOINT_URL)"
    if re.search(r"ACCESS_DENIED|INVALID_ACCESS_KEY_ID|SIGNATURE_DOES_NOT_MATCH|HTTP status 403|AccessDenied|"
                 r"InvalidAccessKeyId|SignatureDoesNotMatch|Forbidden", text):
        return f"{uri}: access denied (credentials missing, wrong or without permission for this bucket)"
    if isinstance(e, FileNotFoundError) or "Path does not exist" in text or "No such file" in text:
        return f"{uri}: no such file or directory"
    return f"{uri}: {text[:240]}"


class Location:
    """A file or directory on some filesystem: `fs` (pyarrow) + `path` (in that filesystem's terms)."""

    __slots__ = ("fs", "path", "scheme")

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str | None):
        self.fs, self.path, self.scheme = fs, path, scheme

    # ---------------------------------------------------------------- naming
    @property
    def is_local(self) -> bool:
        return self.scheme is None

    @property
    def uri(self) -> str:
        return self.path if self.scheme is None else f"{self.scheme}://{self.path}"

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __reduce__(self):
        return (location, (self.uri,))

    def __fspath__(self) -> str:
        """Local Locations are path-like (open(), Path(), libraries); remote ones refuse clearly."""
        if not self.is_local:
            raise TypeError(f"{self.uri} is not a local path")
        return self.path

    def __truediv__(self, name: str | os.PathLike) -> Location:
        name = str(name).strip("/")
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}" if name else self.path, self.scheme)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    @property
    def parent(self) -> Location:
        return Location(self.fs, str(PurePosixPath(self.path).parent), self.scheme)

    def relative_to(self, other: Location) -> str:
        return str(PurePosixPath(self.path).relative_to(PurePosixPath(other.path)))

    # ---------------------------------------------------------------- errors
    def error(self, e: BaseException) -> StorageError:
        return StorageError(describe_error(self.uri, e, self.scheme))

    def _info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as e:
            raise self.error(e) from None

    # ---------------------------------------------------------------- queries
    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def size(self) -> int:
        info = self._info()
        if info.type != pafs.FileType.File:
            raise StorageError(f"{self.uri}: no such file")
        return int(info.size)

    def mtime_ns(self) -> int | None:
        info = self._info()
        return info.mtime_ns if info.type == pafs.FileType.File else None

    def iterdir(self, recursive: bool = False) -> list[Location]:
        """Entries under this directory (files and directories), sorted; [] when it does not exist.

        On object stores the immediate children are derived from one recursive listing: directories are
        only key prefixes there, and delimiter listings differ between stores and emulators."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive or not self.is_local,
                                                            allow_not_found=True))
        except OSError as e:
            raise self.error(e) from None
        paths = {i.path for i in infos}
        if not recursive and not self.is_local:
            base = self.path.rstrip("/") + "/"
            paths = {base + p[len(base):].split("/", 1)[0] for p in paths if p.startswith(base)}
        return sorted((Location(self.fs, p, self.scheme) for p in paths), key=lambda loc: loc.path)

    def files(self, suffix: str | None = None, recursive: bool = True) -> list[Location]:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))
        except OSError as e:
            raise self.error(e) from None
        out = [Location(self.fs, i.path, self.scheme) for i in infos if i.type == pafs.FileType.File
               and (suffix is None or i.path.endswith(suffix))]
        return sorted(out, key=lambda loc: loc.path)

    def glob(self, pattern: str) -> list[Location]:
        """Files below this location matching `pattern` (fnmatch on the relative path; `**` spans levels)."""
        regex = re.compile(fnmatch.translate(pattern).replace(".*.*", ".*"))
        return [f for f in self.files() if regex.match(f.relative_to(self))]

    # ---------------------------------------------------------------- reading
    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except OSError as e:
            raise self.error(e) from None

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any:
        """The file's JSON document; one UserError naming the file for anything that is not JSON text. Besides
        syntax errors, json.loads raises UnicodeDecodeError (bytes that are not UTF-8), a plain ValueError (an
        integer longer than Python's int digit limit) and RecursionError (nesting deeper than the stack)."""
        try:
            return json.loads(self.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{self}: invalid JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError:
            raise UserError(f"{self}: not JSON (not UTF-8 text)") from None
        except (ValueError, RecursionError) as e:
            raise UserError(f"{self}: invalid JSON ({str(e).split(':')[0][:100]})") from None

    # ---------------------------------------------------------------- writing
    def mkdir(self) -> Location:
        """Create this directory (and parents). Object stores need none: a key's prefix exists with it."""
        if self.is_local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        return self

    def open_output(self) -> IO[bytes]:
        if self.is_local:
            self.parent.mkdir()
        try:
            return self.fs.open_output_stream(self.path)
        except OSError as e:
            raise self.error(e) from None

    def write_bytes(self, data: bytes) -> Location:
        """Atomic for readers on every filesystem: a local file is renamed into place, an object store
        makes an object visible only once its upload completed."""
        if self.is_local:
            p = Path(self.path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, p)
            except OSError as e:  # a full disk, say: no half-written temp file is left behind
                tmp.unlink(missing_ok=True)
                raise self.error(e) from None
            return self
        try:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
        except OSError as e:
            raise self.error(e) from None
        return self

    def write_text(self, text: str) -> Location:
        return self.write_bytes(text.encode("utf-8"))

    def upload(self, local: str | os.PathLike) -> Location:
        """Copy a local file or directory tree here (replacing files of the same names)."""
        src = Path(local)
        if self.is_local:
            dst = Path(self.path)
            if src.resolve() == dst.resolve():
                return self
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
            return self
        try:
            if src.is_dir():
                pafs.copy_files(str(src), self.path, source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=self.fs)
            else:
                with open(src, "rb") as f, self.fs.open_output_stream(self.path) as out:
                    shutil.copyfileobj(f, out, length=8 << 20)
        except OSError as e:
            raise self.error(e) from None
        return self

    def download(self, local: str | os.PathLike) -> Path:
        dst = Path(local)
        try:
            if self.is_dir():
                pafs.copy_files(self.path, str(dst), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
            else:
                dst.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(self.path) as f, open(dst, "wb") as out:
                    shutil.copyfileobj(f, out, length=8 << 20)
        except OSError as e:
            raise self.error(e) from None
        return dst

    def local_copy(self, tmp_dir: str | os.PathLike) -> str:
        """A local path of this file, for libraries that read local files only: the file itself when local, else
        a copy downloaded into `tmp_dir` (the caller's temporary directory)."""
        return self.path if self.is_local else str(self.download(Path(tmp_dir) / self.name))

    def copy_to(self, dst: Location) -> Location:
        """Copy a file (server-side within one object store)."""
        if self.is_local and dst.is_local:
            Path(dst.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.path, dst.path)
            return dst
        if self.fs is dst.fs:
            try:
                self.fs.copy_file(self.path, dst.path)
            except OSError as e:
                raise self.error(e) from None
            return dst
        return dst.write_bytes(self.read_bytes())

    def move_to(self, dst: Location) -> Location:
        """Rename (local) or server-side copy + delete (object stores: no rename exists)."""
        try:
            if self.is_local:
                Path(dst.path).parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.path, dst.path)
            else:
                self.fs.move(self.path, dst.path)
        except OSError as e:
            raise self.error(e) from None
        return dst

    def delete(self, missing_ok: bool = True) -> None:
        """Delete a file, or a directory with everything under it."""
        try:
            info = self.fs.get_file_info(self.path)
            if info.type == pafs.FileType.Directory:
                self._delete_dir()
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.path)
            elif not missing_ok:
                raise FileNotFoundError(self.path)
        except OSError as e:
            raise self.error(e) from None

    def _delete_dir(self) -> None:
        try:
            self.fs.delete_dir(self.path)  # S3: batched deletes
        except OSError:
            # GCS (and its emulator) fail on a "directory" that is only a key prefix with no marker object:
            # delete what is under it one by one; nothing left is success.
            for f in self.files():
                self.fs.delete_file(f.path)

    # ---------------------------------------------------------------- checks before work
    def check_readable(self, what: str = "path") -> Location:
        """Exists and can be listed/read; one clear line otherwise (missing bucket, endpoint, credentials)."""
        if not self.exists():
            self._check_bucket()
            raise StorageError(f"{self.uri}: no such {what}")
        return self

    def _check_bucket(self) -> None:
        if self.is_local:
            return
        bucket = self.path.split("/", 1)[0]
        try:
            missing = self.fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError as e:
            raise self.error(e) from None
        if missing:
            raise StorageError(f"{self.uri}: bucket '{bucket}' does not exist")


    def check_writable(self) -> Location:
        """The bucket exists and accepts writes here (a probe object is written and deleted); local: mkdir."""
        if self.is_local:
            try:
                Path(self.path).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StorageError(f"{self.uri}: cannot create directory ({e.strerror or e})") from None
            return self
        self._check_bucket()
        probe = self / f".write-probe-{uuid.uuid4().hex[:12]}"
        probe.write_bytes(b"")
        probe.delete()
        return self


def _usable(path: str) -> bool:
    """Whether pyarrow and the OS can take the path: UTF-8, no NUL (else ValueError or UnicodeEncodeError deep
    inside a call, e.g. for a path read from a damaged manifest)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\0" not in path


def location(path: PathLike) -> Location:
    """A local path, `s3://bucket/key` or `gs://bucket/key` -> Location (local paths made absolute)."""
    if isinstance(path, Location):
        return path
    s = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if not _usable(s):
        raise StorageError(f"{s!r}: not a usable path (it holds a NUL or a character that is not UTF-8)")
    m = _URI.match(s)
    if not m:
        return Location(pafs.LocalFileSystem(), str(Path(s).expanduser().resolve()), None)
    scheme, rest = m.group(1).lower(), m.group(2).rstrip("/")
    if scheme == "file":
        return Location(pafs.LocalFileSystem(), str(Path("/" + rest).resolve()), None)
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(f"{s}: unsupported scheme {scheme}:// (use a local path, s3:// or gs://)")
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{s}: missing bucket name (expected {scheme}://bucket/prefix)")
    return Location(filesystem_for(scheme, bucket, s), rest, scheme)


def ray_storage(path: PathLike) -> tuple[str, pafs.FileSystem | None]:
    """(storage_path, storage_filesystem) for Ray Train/Tune RunConfig: remote paths go with our filesystem
    (so Ray uses the same endpoint and credentials), local ones as absolute paths."""
    loc = location(path)
    return (loc.path, None) if loc.is_local else (loc.path, loc.fs)
