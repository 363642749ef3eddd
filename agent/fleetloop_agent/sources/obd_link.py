"""The two ways to reach an OBD-II ECU, behind one narrow interface (:class:`ObdLink`): diagnostic
requests over ISO-TP on a CAN bus (can-isotp in userspace, on any python-can bus), or through an ELM327
adapter on a serial port (our own small client over pyserial).

Only this module imports can-isotp and pyserial, and maps their failures: a link that cannot be opened
or that breaks raises :class:`~fleetloop_shared.errors.UnavailableError` (the source reconnects); an ECU
that does not answer is an empty answer, not an error.

ELM327: the adapter is set up with echo, linefeeds and spaces off and headers on (``ATZ ATE0 ATL0 ATS0
ATH1 ATSP<n>``), so every answer line is one CAN frame, ``<header><PCI><data>``, and the ISO-TP frames of
each ECU are joined here (:func:`parse_elm_lines`). Only the CAN protocols (ISO 15765-4, 6 to 9) are
supported; an adapter that settles on another says so at connect.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Mapping
from typing import Any, Final, Protocol

from fleetloop_shared.choices import check_choice
from fleetloop_shared.errors import UnavailableError

ELM_PROTOCOLS: Final = ("0", "6", "7", "8", "9")
_ELM_FAILURES: Final = (
    "UNABLE TO CONNECT",
    "CAN ERROR",
    "BUS ERROR",
    "BUS INIT",
    "STOPPED",
    "ERR",
    "LV RESET",
)
_HEX: Final = re.compile(r"[0-9A-F]+")


class ObdLink(Protocol):
    """One diagnostic conversation partner: send a request, get every ECU's answer."""

    def open(self) -> None: ...

    def request(self, payload: bytes, timeout_s: float) -> list[tuple[int, bytes]]:
        """``(responder id, answer)`` per ECU that answered ``payload`` within ``timeout_s``."""
        ...

    def close(self) -> None: ...


# -- ISO-TP on a CAN bus -----------------------------------------------------------------------------------


class IsoTpLink:
    """Physical addressing of one ECU (``request_id`` -> ``response_id``, 7E0/7E8 by default)."""

    def __init__(
        self,
        interface: str,
        channel: str,
        *,
        options: Mapping[str, Any] | None = None,
        request_id: int = 0x7E0,
        response_id: int = 0x7E8,
        extended: bool = False,
    ) -> None:
        self._interface = interface
        self._channel = channel
        self._options = dict(options or {})
        self._request_id = request_id
        self._response_id = response_id
        self._extended = extended
        self._bus: Any = None
        self._stack: Any = None
        self._failure: str | None = None

    # can-isotp runs these on its own threads: a bus that fails there is remembered, not raised, and the
    # next request reports it (otherwise the stack's thread would die and requests merely time out)
    def _rx(self, timeout: float) -> Any:
        import isotp

        if self._failure is not None:
            time.sleep(timeout)
            return None
        try:
            msg = self._bus.recv(timeout)
        except Exception as exc:  # the bus went away under the stack
            self._failure = f"{type(exc).__name__}: {exc}"
            return None
        if msg is None or msg.is_error_frame or msg.is_remote_frame:
            return None
        return isotp.CanMessage(
            arbitration_id=msg.arbitration_id, data=msg.data, extended_id=msg.is_extended_id, is_fd=msg.is_fd
        )

    def _tx(self, msg: Any) -> None:
        import can

        try:
            self._bus.send(
                can.Message(
                    arbitration_id=msg.arbitration_id, data=msg.data, is_extended_id=msg.is_extended_id
                )
            )
        except Exception as exc:
            self._failure = f"{type(exc).__name__}: {exc}"

    def open(self) -> None:
        import can
        import isotp

        # on a busy bus only the ECU's answers are wanted: the adapter (or the remote server, or the
        # kernel) drops every other frame before this process has to look at it
        mask = 0x1FFFFFFF if self._extended else 0x7FF
        answers = [{"can_id": self._response_id, "can_mask": mask, "extended": self._extended}]
        options = {"can_filters": answers, **self._options}
        try:
            self._bus = can.Bus(interface=self._interface, channel=self._channel, **options)
        except Exception as exc:  # python-can raises many types for an absent interface
            raise UnavailableError(
                f"cannot open {self._interface} channel {self._channel!r}: {exc}"
            ) from None
        mode = isotp.AddressingMode.Normal_29bits if self._extended else isotp.AddressingMode.Normal_11bits
        address = isotp.Address(mode, txid=self._request_id, rxid=self._response_id)
        # ISO 15765-4: every frame 8 bytes (padded); the ECU paces consecutive frames by our flow control
        params = {"tx_data_min_length": 8, "tx_padding": 0x55, "blocking_send": False}
        self._failure = None
        self._stack = isotp.TransportLayer(rxfn=self._rx, txfn=self._tx, address=address, params=params)
        self._stack.start()

    def request(self, payload: bytes, timeout_s: float) -> list[tuple[int, bytes]]:
        stack = self._stack
        if stack is None:
            raise UnavailableError("ISO-TP link not open")
        while stack.available():  # a late answer to an earlier request is not this one's
            stack.recv()
        if self._failure is None:
            stack.send(payload)
            answer = stack.recv(block=True, timeout=timeout_s)
        if self._failure is not None:
            raise UnavailableError(f"{self._interface} channel {self._channel!r} failed: {self._failure}")
        return [] if answer is None else [(self._response_id, bytes(answer))]

    def close(self) -> None:
        stack, self._stack = self._stack, None
        bus, self._bus = self._bus, None
        if stack is not None:
            with contextlib.suppress(Exception):  # stopping a stack whose bus died can fail
                stack.stop()
        if bus is not None:
            try:
                bus.shutdown()
            except Exception:  # a bus that died may fail to close too: mark it closed all the same
                import can

                can.BusABC.shutdown(bus)


# -- ELM327 ------------------------------------------------------------------------------------------------


def parse_elm_lines(lines: list[str]) -> list[tuple[int, bytes]]:
    """Join the ISO-TP frames of an ELM327 answer (headers on, spaces off) into one payload per ECU.

    An 11-bit header is 3 hex digits (lines of odd length), a 29-bit one 8. Lines that are not frames
    (``SEARCHING...``, an echo) are passed over; a frame out of sequence drops that ECU's answer.
    """
    frames: dict[int, list[bytes]] = {}
    for raw in lines:
        line = raw.strip().replace(" ", "").upper()
        if not line or not _HEX.fullmatch(line):
            continue
        head = 3 if len(line) % 2 else 8
        if len(line) < head + 2:
            continue
        frames.setdefault(int(line[:head], 16), []).append(bytes.fromhex(line[head:]))
    out = []
    for header, parts in frames.items():
        payload = _join_isotp(parts)
        if payload is not None:
            out.append((header, payload))
    return sorted(out)


def _join_isotp(parts: list[bytes]) -> bytes | None:
    first = parts[0]
    kind = first[0] >> 4
    if kind == 0:
        size = first[0] & 0x0F
        return first[1 : 1 + size] if 0 < size <= len(first) - 1 else None
    if kind != 1 or len(first) < 2:
        return None
    size = ((first[0] & 0x0F) << 8) | first[1]
    data = bytearray(first[2:])
    expected = 1
    for frame in parts[1:]:
        if frame[0] >> 4 != 2:
            continue  # a flow control frame, shown by some adapters
        if frame[0] & 0x0F != expected % 16:
            return None
        data += frame[1:]
        expected += 1
    return bytes(data[:size]) if len(data) >= size else None


class Elm327Link:
    """An ELM327 (or compatible) adapter on a serial port."""

    def __init__(
        self, port: str, *, baudrate: int = 38400, protocol: str = "0", reset_timeout_s: float = 5.0
    ) -> None:
        check_choice(protocol, ELM_PROTOCOLS, "ELM327 protocol (the CAN ones)")
        self._port = port
        self._baudrate = baudrate
        self._protocol = protocol
        self._reset_timeout = reset_timeout_s
        self._serial: Any = None

    def open(self) -> None:
        import serial

        try:
            self._serial = serial.Serial(self._port, self._baudrate, timeout=0.05, write_timeout=1.0)
        except (serial.SerialException, OSError, ValueError) as exc:
            raise UnavailableError(f"cannot open serial port {self._port}: {exc}") from None
        self._command("ATZ", self._reset_timeout)
        for setting in ("ATE0", "ATL0", "ATS0", "ATH1", f"ATSP{self._protocol}"):
            answer = self._command(setting, 2.0)
            if not any("OK" in line for line in answer):
                raise UnavailableError(
                    f"ELM327 on {self._port} refused {setting}: {' '.join(answer) or 'no answer'}"
                )

    def _command(self, text: str, timeout_s: float) -> list[str]:
        """Send one line; the adapter's answer lines (up to its ``>`` prompt)."""
        import serial

        port = self._serial
        if port is None:
            raise UnavailableError("ELM327 link not open")
        try:
            port.reset_input_buffer()
            port.write(text.encode("ascii") + b"\r")
            buf = bytearray()
            deadline = time.monotonic() + timeout_s
            while not buf.endswith(b">"):
                if time.monotonic() > deadline:
                    raise UnavailableError(
                        f"ELM327 on {self._port}: no prompt after {text!r} within {timeout_s}s"
                    )
                buf += port.read(port.in_waiting or 1)
        except (serial.SerialException, OSError) as exc:
            raise UnavailableError(f"ELM327 on {self._port}: {exc}") from None
        lines = [
            ln.strip() for ln in buf[:-1].decode("ascii", errors="replace").replace("\n", "\r").split("\r")
        ]
        return [ln for ln in lines if ln and ln != text]

    def request(self, payload: bytes, timeout_s: float) -> list[tuple[int, bytes]]:
        lines = self._command(payload.hex().upper(), timeout_s + 3.0)  # the first may search protocols
        upper = [ln.upper() for ln in lines]
        if any(ln.startswith(f) for ln in upper for f in _ELM_FAILURES):
            raise UnavailableError(f"ELM327 on {self._port}: {' '.join(lines)}")
        if any(ln in ("NO DATA", "?") for ln in upper):
            return []
        return parse_elm_lines(lines)

    def close(self) -> None:
        port, self._serial = self._serial, None
        if port is not None:
            with contextlib.suppress(Exception):  # closing a vanished port can fail
                port.close()
