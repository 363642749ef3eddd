"""Vector BLF bus logs (binary logging format: CANalyzer, CANoe and many loggers), through python-can's
``BLFReader``.

Only this module of the recordings package imports python-can, and only when a file is read; its errors
on outside bytes (a bad header, a truncated or corrupt compressed block) become one ConfigError naming
the file. Channels are numbered from 0 (BLF's channel 1 is bus 0); error frames carry no signal value
and are passed over; CAN FD payloads keep their full length.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from fleetloop_agent.recordings.can_logs import MAX_PAYLOAD_BYTES, CanFrames, _Columns
from fleetloop_agent.recordings.cells import float_seconds_to_ns
from fleetloop_agent.recordings.text import MAX_INPUT_BYTES, check_size
from fleetloop_shared.errors import ConfigError


def read_blf(path: Path, *, limit: int = MAX_INPUT_BYTES) -> CanFrames:
    """Every CAN and CAN FD data frame of a BLF file, in file order."""
    path = Path(path)
    check_size(path, limit)
    with path.open("rb") as fh:
        if fh.read(4) != b"LOGG":
            raise ConfigError(f"{path}: not a BLF file (no 'LOGG' signature)")
    from can.io.blf import BLFParseError, BLFReader

    out = _Columns()
    try:
        with BLFReader(str(path)) as reader:
            for msg in reader:
                if msg.is_error_frame:
                    continue
                data = b"" if msg.is_remote_frame else bytes(msg.data)
                if len(data) > MAX_PAYLOAD_BYTES:
                    raise ConfigError(f"{path}: frame of {len(data)} bytes (at most {MAX_PAYLOAD_BYTES})")
                channel = msg.channel if isinstance(msg.channel, int) else 0
                t_ns = int(float_seconds_to_ns(msg.timestamp))
                out.add(t_ns, channel, int(msg.arbitration_id), data)
    except (BLFParseError, struct.error, zlib.error, EOFError, ValueError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable BLF file ({type(exc).__name__}: {exc})") from None
    return out.frames()
