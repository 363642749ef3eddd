"""The error tree maps each class once to an exit code, an HTTP status and a gRPC code."""

from __future__ import annotations

import inspect

import grpc

from fleetloop_shared import errors


def _classes() -> list[type[errors.FleetloopError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.FleetloopError)]


def test_every_error_maps_to_real_codes() -> None:
    for cls in _classes():
        assert grpc.StatusCode[cls.grpc_code] is not None
        assert 400 <= cls.http_status <= 599
        assert 1 <= cls.exit_code <= 125


def test_user_errors_are_client_side_and_integrity_is_not_retryable() -> None:
    assert errors.ConfigError.http_status == 400 and errors.ConfigError.exit_code == 2
    assert errors.NotFoundError.http_status == 404
    assert errors.UnavailableError.grpc_code == "UNAVAILABLE"
    assert errors.CorruptSegmentError.grpc_code == "DATA_LOSS"


def test_rule_error_points_at_file_line_col() -> None:
    exc = errors.RuleError("unknown function 'avgg'", line=7, col=12, source="brake.yaml")
    assert str(exc) == "brake.yaml:7:12: unknown function 'avgg'"
    assert exc.reason == "unknown function 'avgg'"


def test_a_subclass_header_changes_only_what_it_names() -> None:
    class Late(errors.UnavailableError, http_status=504):
        """A peer answered too late."""

    class Body(errors.NotFoundError):
        """Set in the body, the old way, still counts."""

        exit_code = 9

    assert (Late.exit_code, Late.http_status, Late.grpc_code) == (6, 504, "UNAVAILABLE")
    assert (Body.exit_code, Body.http_status, Body.grpc_code) == (9, 404, "NOT_FOUND")
    assert errors.UnavailableError.http_status == 503  # the parent keeps its own
