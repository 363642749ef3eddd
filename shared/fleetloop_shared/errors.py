"""One error tree for all of fleetloop, split by who is at fault.

Every error a user can cause or meet is a :class:`FleetloopError`. Each class says once, in its header,
how it maps to a process exit code, an HTTP status and a gRPC status name (what it leaves out it maps as
its parent does), so the CLI, the REST API and the gRPC services never invent their own mapping. The
split follows who must act:

* :class:`UserError` — the caller's input is wrong (config, rule, SQL, arguments). Fix the input.
* :class:`IntegrityError` — bytes from outside are corrupt or forged (segment, artifact, signature,
  protobuf). Never trusted, never applied.
* :class:`UnavailableError` — a peer cannot be reached now (cloud, artifact server). Retry later.
* :class:`StateError` — the request conflicts with current state (rollout already finished, ...).
* :class:`InternalError` — a bug on our side.

Messages are one line that says what was wrong and where; a user never sees a traceback for their own
mistake.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FleetloopError(Exception):
    """Base of every fleetloop error."""

    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[str] = "INTERNAL"

    def __init_subclass__(
        cls, *, exit_code: int = 0, http_status: int = 0, grpc_code: str = "", **kwargs: Any
    ) -> None:
        """A subclass names in its header what it maps differently from its parent; the rest it
        inherits (so a new code is one keyword, not a block of attributes to keep in step)."""
        super().__init_subclass__(**kwargs)
        cls.exit_code = exit_code or cls.exit_code
        cls.http_status = http_status or cls.http_status
        cls.grpc_code = grpc_code or cls.grpc_code

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UserError(FleetloopError, exit_code=2, http_status=400, grpc_code="INVALID_ARGUMENT"):
    """The caller's input is wrong; the message says what and where."""


class ConfigError(UserError):
    """A configuration file is missing, unreadable or invalid."""


class RuleError(UserError):
    """A campaign document or trigger expression does not compile.

    ``location`` is ``FILE:LINE:COL`` (or ``LINE:COL`` without a file) pointing at the fault.
    """

    def __init__(self, message: str, *, line: int = 0, col: int = 0, source: str = "") -> None:
        self.reason = message
        self.line = line
        self.col = col
        self.source = source
        loc = ":".join(str(p) for p in ([source] if source else []) + ([line, col] if line else []))
        super().__init__(f"{loc}: {message}" if loc else message)


class QueryError(UserError):
    """A SQL query is invalid or refers to something that does not exist."""


class NotFoundError(UserError, exit_code=3, http_status=404, grpc_code="NOT_FOUND"):
    """A named thing (device, artifact, rollout, file) does not exist."""


class PermissionDeniedError(UserError, exit_code=4, http_status=403, grpc_code="PERMISSION_DENIED"):
    """The caller is not allowed to do this."""


class UnauthenticatedError(UserError, exit_code=4, http_status=401, grpc_code="UNAUTHENTICATED"):
    """The request carries no valid credential (a token missing, unknown, expired or revoked); the
    message says which and how to get one."""


class PayloadTooLargeError(UserError, http_status=413):
    """A request body is larger than the route accepts; refused before it is read."""


class IntegrityError(FleetloopError, exit_code=5, http_status=422, grpc_code="DATA_LOSS"):
    """Bytes from outside failed a check: checksum, hash, signature, structure."""


class CorruptSegmentError(IntegrityError):
    """A segment is truncated, has a bad checksum or an impossible header."""


class ArtifactVerificationError(IntegrityError):
    """An update artifact or its metadata failed signature or hash verification."""


class MalformedMessageError(IntegrityError, http_status=400, grpc_code="INVALID_ARGUMENT"):
    """A protobuf or JSON message from a peer could not be decoded or is inconsistent."""


class PrivacyViolationError(IntegrityError, grpc_code="INVALID_ARGUMENT"):
    """An uploaded segment carries what its campaign's privacy policy keeps on the device (a dropped
    signal, a clear identifier): refused for good, so the device does not send it again."""


class UnavailableError(FleetloopError, exit_code=6, http_status=503, grpc_code="UNAVAILABLE"):
    """A peer (cloud, artifact server) cannot be reached now; retrying may help."""


class StateError(FleetloopError, exit_code=7, http_status=409, grpc_code="FAILED_PRECONDITION"):
    """The request conflicts with the current state of the thing it acts on."""


class StorageFullError(FleetloopError, exit_code=8, http_status=507, grpc_code="RESOURCE_EXHAUSTED"):
    """A disk quota or the disk itself is full; nothing was half-written."""


class InternalError(FleetloopError):
    """A bug on our side; the message says where."""


#: Exit code of the CLI when interrupted (Ctrl-C), as shells expect.
EXIT_INTERRUPTED = 130
