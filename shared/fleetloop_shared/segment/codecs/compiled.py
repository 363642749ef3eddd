"""Optional numba kernels, built once per process, with numpy as the always-correct fallback.

Every codec that has a compiled inner loop follows one rule: the kernels are an accelerator, never a
requirement. numba missing, ``FLEETLOOP_NO_NUMBA`` set, an intrinsic a numba version lacks, an LLVM or
on-disk cache failure, a probe that does not give the expected answer — each means "run the numpy
path", which writes identical bytes, never a failed encode. That rule lives here once, so that a codec
module only says how to build its kernels.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

_switched_off: list[bool] = []


@contextlib.contextmanager
def numpy_only() -> Iterator[None]:
    """Run the body on the numpy paths, as on a machine without numba (the tests compare the two)."""
    _switched_off.append(True)
    try:
        yield
    finally:
        _switched_off.pop()


def numba_kernels(build: Callable[[], T | None]) -> Callable[[], T | None]:
    """Turn ``build() -> kernels`` into a loader called at each use: built on the first call only.

    ``build`` imports numba, compiles its kernels and runs them once on a small probe (so compilation
    happens there, where a failure is caught); it returns ``None`` when the probe gives a wrong answer.
    Any exception it raises counts as "no accelerator".
    """
    built: list[T | None] = []

    @functools.wraps(build)
    def load() -> T | None:
        if _switched_off:
            return None
        if not built:
            built.append(_build(build))
        return built[0]

    return load


def _build(build: Callable[[], T | None]) -> T | None:
    if os.environ.get("FLEETLOOP_NO_NUMBA"):
        return None
    try:
        return build()
    except Exception:  # any failure of the optional accelerator falls back to the numpy path
        return None
