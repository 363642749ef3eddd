"""LZMA2 with a preset dictionary, for the cloud's delta encoder (liblzma through ctypes).

Why: LZMA2 whose dictionary starts out holding old regions is patch-from with LZMA's coder — literals
coded against the byte at the last match distance, which on rebuilt code is often the old byte — and on
the benchmark pairs it is 3–7 % smaller than zstd-19 patch-from at a third of zstd-19's CPU (decision
0023, addendum 2). Python's :mod:`lzma` cannot set a preset dictionary, liblzma can; this adapter is
the only place that reaches it, and only the *encoder* needs it: the device decodes the same stream with
the standard library by feeding the decoder the dictionary first as LZMA2 uncompressed chunks
(:func:`fleetloop_shared.update.fldelta2_apply.dictionary_prefix`), which leaves the decoder in the
state a preset dictionary would.

Without a loadable liblzma :func:`available` is false and the encoder falls back to zstd patch-from;
:func:`compress` failing (liblzma out of memory) raises :class:`InternalError`, on which the encoder
falls back the same way for that chunk.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterator

from fleetloop_shared.errors import InternalError

_FILTER_LZMA2 = 0x21
_VLI_UNKNOWN = (1 << 64) - 1
_MF_HC4 = 0x04
_MODE_NORMAL = 2
_PRESET = 6
#: Match finder settings (hash chain, nice length 16, depth 4): measured on the benchmark pairs against
#: the default (binary tree, nice 64) they cost a third of the CPU for 1–4 % more bytes, still 2–5 %
#: under zstd-19 patch-from (benchmarks/delta.py; docs/benchmarks.md).
_NICE = 16
_DEPTH = 4
_LZMA_OK = 0


class _Options(ctypes.Structure):
    """``lzma_options_lzma`` as liblzma 5.x declares it (``lzma/lzma12.h``): 5.4 renamed the first three
    reserved integers, the layout is the same since 5.0."""

    _fields_ = [
        ("dict_size", ctypes.c_uint32),
        ("preset_dict", ctypes.c_void_p),
        ("preset_dict_size", ctypes.c_uint32),
        ("lc", ctypes.c_uint32),
        ("lp", ctypes.c_uint32),
        ("pb", ctypes.c_uint32),
        ("mode", ctypes.c_int),
        ("nice_len", ctypes.c_uint32),
        ("mf", ctypes.c_int),
        ("depth", ctypes.c_uint32),
        ("ext_flags", ctypes.c_uint32),
        ("ext_size_low", ctypes.c_uint32),
        ("ext_size_high", ctypes.c_uint32),
        ("reserved_int4", ctypes.c_uint32),
        ("reserved_int5", ctypes.c_uint32),
        ("reserved_int6", ctypes.c_uint32),
        ("reserved_int7", ctypes.c_uint32),
        ("reserved_int8", ctypes.c_uint32),
        ("reserved_enum1", ctypes.c_int),
        ("reserved_enum2", ctypes.c_int),
        ("reserved_enum3", ctypes.c_int),
        ("reserved_enum4", ctypes.c_int),
        ("reserved_ptr1", ctypes.c_void_p),
        ("reserved_ptr2", ctypes.c_void_p),
    ]


class _Filter(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint64), ("options", ctypes.c_void_p)]


def _names() -> Iterator[str]:
    yield "liblzma.so.5"
    found = ctypes.util.find_library("lzma")  # runs ldconfig or a compiler: only if the usual name fails
    if found:
        yield found


@functools.cache
def _library() -> ctypes.CDLL | None:
    for name in _names():
        try:
            lib = ctypes.CDLL(name)
            lib.lzma_lzma_preset.argtypes = [ctypes.POINTER(_Options), ctypes.c_uint32]
            lib.lzma_lzma_preset.restype = ctypes.c_ubyte
            lib.lzma_raw_buffer_encode.argtypes = [
                ctypes.POINTER(_Filter),
                ctypes.c_void_p,
                ctypes.c_char_p,
                ctypes.c_size_t,
                ctypes.c_void_p,
                ctypes.POINTER(ctypes.c_size_t),
                ctypes.c_size_t,
            ]
            lib.lzma_raw_buffer_encode.restype = ctypes.c_int
        except (OSError, AttributeError):  # not there, or a library without these symbols
            continue
        return lib
    return None


def available() -> bool:
    """Whether liblzma can be loaded here (the cloud's encoder then offers the lzma-patch method)."""
    return _library() is not None


def compress(dictionary: bytes, data: bytes, dict_size: int) -> bytes:
    """One raw LZMA2 stream (end mark included) of ``data``, its dictionary preset with ``dictionary``;
    ``dict_size`` (≥ both together) is what the decoder will allocate, so no match reaches further."""
    lib = _library()
    if lib is None:
        raise InternalError("liblzma is not available: the lzma-patch method cannot be made")
    options = _Options()
    if lib.lzma_lzma_preset(ctypes.byref(options), _PRESET):
        raise InternalError("liblzma refused its own preset")
    keep = ctypes.create_string_buffer(dictionary, len(dictionary)) if dictionary else None
    options.preset_dict = ctypes.cast(keep, ctypes.c_void_p) if keep is not None else None
    options.preset_dict_size = len(dictionary)
    options.dict_size = dict_size
    options.mf, options.mode, options.nice_len, options.depth = _MF_HC4, _MODE_NORMAL, _NICE, _DEPTH
    filters = (_Filter * 2)(
        _Filter(_FILTER_LZMA2, ctypes.cast(ctypes.pointer(options), ctypes.c_void_p)),
        _Filter(_VLI_UNKNOWN, None),
    )
    room = len(data) + (len(data) >> 4) + (64 << 10)
    out = ctypes.create_string_buffer(room)
    pos = ctypes.c_size_t(0)
    ret = lib.lzma_raw_buffer_encode(filters, None, data, len(data), out, ctypes.byref(pos), room)
    if ret != _LZMA_OK:
        raise InternalError(f"liblzma could not encode a {len(data)}-byte chunk (lzma_ret {ret})")
    return ctypes.string_at(out, pos.value)
