"""The S3 adapter: :class:`~fleetloop_cloud.storage.objects.ObjectStore` over an S3-compatible bucket,
through pyarrow's S3 file system (docs/decisions/0024-object-storage-through-pyarrow-s3.md says why that
client). The only module that builds an S3 client: the Iceberg fleet store gets its file system from
:func:`s3_filesystem` too, so both use one set of endpoint, credentials, timeouts and retries.

Failures a bucket shows (a 500 or 503, a throttle, a reset connection, an answer slower than
``request_timeout_s``) are retried by the AWS SDK's standard strategy with backoff, up to
``max_attempts`` per request; every operation here is idempotent by key (a put replaces the same bytes,
a delete of a missing object succeeds), so a retried request that had in fact landed does no harm. What
still fails becomes UnavailableError, a missing object NotFoundError.
"""

from __future__ import annotations

import configparser
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager

from pyarrow import fs

from fleetloop_cloud.storage.objects import ObjectInfo, S3Settings, check_key
from fleetloop_shared.errors import ConfigError, NotFoundError, UnavailableError

#: What an S3 service answers when it refuses the credentials.
_REFUSED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")


def _credentials(settings: S3Settings) -> dict[str, str]:
    """Keys from the shared-credentials file, or none (the SDK's chain: environment, instance role)."""
    path = settings.credentials_file
    if path is None:
        return {}
    parser = configparser.ConfigParser()
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except (OSError, configparser.Error) as exc:
        raise ConfigError(f"{path}: cannot read S3 credentials: {exc}") from None
    if not parser.has_section(settings.profile):
        raise ConfigError(f"{path}: no [{settings.profile}] profile with S3 credentials")
    section = parser[settings.profile]
    try:
        out = {"access_key": section["aws_access_key_id"], "secret_key": section["aws_secret_access_key"]}
    except KeyError as exc:
        raise ConfigError(f"{path}: [{settings.profile}] lacks {exc.args[0]}") from None
    if "aws_session_token" in section:
        out["session_token"] = section["aws_session_token"]
    return out


def s3_filesystem(settings: S3Settings, *, single_put: bool = False) -> fs.S3FileSystem:
    """pyarrow's S3 file system for ``settings`` (paths are ``bucket/key``). With ``single_put``, an
    object written in one piece smaller than a multipart part is sent as one PUT (pyarrow's delayed
    open), not as a multipart upload of three requests; a failure then shows when the stream closes."""
    kwargs: dict[str, object] = dict(_credentials(settings))
    if settings.endpoint:
        parts = urllib.parse.urlsplit(settings.endpoint)
        kwargs["endpoint_override"] = parts.netloc or settings.endpoint
        kwargs["scheme"] = parts.scheme or "https"
    return fs.S3FileSystem(
        region=settings.region,
        request_timeout=settings.request_timeout_s,
        connect_timeout=settings.connect_timeout_s,
        retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
        allow_delayed_open=single_put,
        **kwargs,
    )


@contextmanager
def mapped_errors(what: str) -> Iterator[None]:
    """pyarrow's errors as ours: a missing object NotFoundError, anything else that reached the bucket
    (after the SDK's retries) UnavailableError."""
    try:
        yield
    except FileNotFoundError:
        raise NotFoundError(f"{what}: no such object") from None
    except OSError as exc:
        text = str(exc).strip().splitlines()
        raise UnavailableError(f"{what}: {text[0] if text else type(exc).__name__}") from None


class S3ObjectStore:
    """Objects under ``s3://bucket/prefix/area/``."""

    def __init__(
        self, settings: S3Settings, *, area: str = "", filesystem: fs.S3FileSystem | None = None
    ) -> None:
        self.settings = settings
        base = "/".join(p for p in (settings.prefix, area) if p)
        self._base = f"{settings.bucket}/{base}" if base else settings.bucket
        self.location = f"s3://{self._base}"
        self._fs = filesystem if filesystem is not None else s3_filesystem(settings)

    def check_bucket(self) -> None:
        """ConfigError, at start, for a bucket that is not there or credentials it refuses: an
        operator's mistake, said as such rather than as the first failed write."""
        bucket, where = self.settings.bucket, self.settings.endpoint or "AWS"
        try:
            info = self._fs.get_file_info(bucket)
        except OSError as exc:
            text = str(exc)
            if any(s in text for s in _REFUSED):
                raise ConfigError(
                    f"storage: {where} refused the S3 credentials for bucket {bucket} "
                    f"(storage.credentials_file or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): "
                    f"{text.strip().splitlines()[0]}"
                ) from None
            detail = text[:300]
            raise UnavailableError(f"storage: cannot reach bucket {bucket} at {where}: {detail}") from None
        if info.type == fs.FileType.NotFound:
            raise ConfigError(f"storage.bucket {bucket!r} does not exist at {where}: create it first")

    def _path(self, key: str) -> str:
        return f"{self._base}/{check_key(key)}"

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        with mapped_errors(f"s3://{path}"), self._fs.open_output_stream(path) as out:
            out.write(data)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        with mapped_errors(f"s3://{path}"), self._fs.open_input_stream(path) as src:
            return bytes(src.readall())

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        with mapped_errors(f"s3://{path}"):
            info = self._fs.get_file_info(path)
        if info.type != fs.FileType.File:
            raise NotFoundError(f"s3://{path}: no such object")
        modified = info.mtime.timestamp() if info.mtime is not None else 0.0
        return ObjectInfo(key, int(info.size or 0), modified)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        path = self._path(key)
        with mapped_errors(f"s3://{path}"), self._fs.open_input_file(path) as src:
            size = src.size()
            begin = min(max(0, start), size)
            return bytes(src.read_at(min(max(0, length), size - begin), begin)) if begin < size else b""

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            with mapped_errors(f"s3://{path}"):
                self._fs.delete_file(path)
        except NotFoundError:
            pass

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        root = f"{self._base}/{folder}".rstrip("/")
        selector = fs.FileSelector(root, recursive=True, allow_not_found=True)
        with mapped_errors(f"s3://{root}"):
            infos = self._fs.get_file_info(selector)
        out = []
        cut = len(self._base) + 1
        for info in infos:
            if info.type != fs.FileType.File:
                continue
            key = info.path[cut:]
            if key.startswith(prefix):
                modified = info.mtime.timestamp() if info.mtime is not None else 0.0
                out.append(ObjectInfo(key, int(info.size or 0), modified))
        out.sort(key=lambda o: o.key)
        return out
