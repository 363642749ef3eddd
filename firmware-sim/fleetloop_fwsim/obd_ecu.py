"""A simulated engine ECU answering OBD-II on a CAN bus: service 01 PIDs (values from a callable of
time), their support bitmaps, and service 09's VIN, over ISO-TP (can-isotp, the same library and
standard the agent uses, on any python-can bus).

:class:`ObdEcu` is the pure part (request bytes in, answer bytes out); :class:`IsoTpEcu` puts it on a
bus. Like real ECUs, it ignores requests for PIDs it does not support (no answer at all), and it can be
told to behave like the many ECUs that refuse multi-PID requests: answer only the first PID
(``multi_pid="first"``), answer with a negative response (``"negative"``), or stay silent
(``"silent"``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

from fleetloop_shared.choices import check_choice
from fleetloop_shared.obd_pids import (
    MAX_PIDS_PER_REQUEST,
    NEGATIVE,
    PID_VIN,
    PIDS,
    POSITIVE,
    SERVICE_CURRENT,
    SERVICE_VEHICLE_INFO,
    SUPPORT_PIDS,
    support_bitmap,
)

MULTI_PID_MODES: Final = ("answer", "first", "negative", "silent")
#: Negative response code: sub-function not supported / request out of range.
NRC_NOT_SUPPORTED: Final = 0x12
DEFAULT_VIN: Final = "1FLEETL00PSIM0001"


def drive_values(t_s: float) -> dict[int, float]:
    """A slow, smooth drive: what the ECU reports when given nothing else."""
    phase = math.sin(t_s / 10.0)
    return {
        0x04: 40 + 20 * phase,
        0x05: 90.0,
        0x0C: 1800 + 600 * phase,
        0x0D: 60 + 30 * phase,
        0x0F: 25.0,
        0x10: 12.5 + 4 * phase,
        0x11: 30 + 10 * phase,
        0x2F: 55.0,
        0x42: 14.2,
        0x46: 18.0,
    }


class ObdEcu:
    """Answers to OBD-II requests."""

    def __init__(
        self,
        *,
        values: Callable[[float], Mapping[int, float]] = drive_values,
        supported: Collection[int] | None = None,
        vin: str = DEFAULT_VIN,
        multi_pid: str = "answer",
    ) -> None:
        check_choice(multi_pid, MULTI_PID_MODES, "multi_pid", error=ValueError)
        self._values = values
        self.supported = set(values(0.0)) if supported is None else set(supported)
        unknown = self.supported - set(PIDS)
        if unknown:
            raise ValueError(f"no formula for PIDs {sorted(unknown)}")
        self._vin = vin.encode("ascii")
        self._multi = multi_pid
        #: Requests seen, in order (what a test asks "was this asked?").
        self.requests: list[bytes] = []

    def _bitmaps(self) -> set[int]:
        """The support PIDs to answer: 00, and each next one whose range (or beyond) holds a PID."""
        top = max(self.supported, default=0)
        return {base for base in SUPPORT_PIDS if base == 0 or base < top}

    def answer(self, request: bytes, t_s: float) -> bytes | None:
        self.requests.append(bytes(request))
        if len(request) < 2:
            return None
        service, pids = request[0], list(request[1:])
        if service == SERVICE_VEHICLE_INFO:
            if pids == [0x00]:
                return bytes([SERVICE_VEHICLE_INFO + POSITIVE, 0x00]) + support_bitmap(0, {PID_VIN})
            if pids == [PID_VIN]:
                return bytes([SERVICE_VEHICLE_INFO + POSITIVE, PID_VIN, 0x01]) + self._vin
            return None
        if service != SERVICE_CURRENT or len(pids) > MAX_PIDS_PER_REQUEST:
            return None
        if len(pids) > 1 and self._multi != "answer":
            if self._multi == "silent":
                return None
            if self._multi == "negative":
                return bytes([NEGATIVE, SERVICE_CURRENT, NRC_NOT_SUPPORTED])
            pids = pids[:1]
        values = self._values(t_s)
        bitmaps = self._bitmaps()
        body = bytearray([SERVICE_CURRENT + POSITIVE])
        for pid in pids:
            if pid in SUPPORT_PIDS and pid in bitmaps:
                body += bytes([pid]) + support_bitmap(pid, self.supported | bitmaps)
            elif pid in self.supported and pid in values:
                body += bytes([pid]) + PIDS[pid].encode(values[pid])
        return bytes(body) if len(body) > 1 else None


class IsoTpEcu:
    """An :class:`ObdEcu` on a python-can bus: requests on ``request_id`` (and the functional 7DF),
    answers on ``response_id``, from its own thread."""

    def __init__(
        self,
        bus: Any,
        ecu: ObdEcu,
        *,
        request_id: int = 0x7E0,
        response_id: int = 0x7E8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import isotp

        self.ecu = ecu
        address = isotp.Address(isotp.AddressingMode.Normal_11bits, txid=response_id, rxid=request_id)
        params = {"tx_data_min_length": 8, "tx_padding": 0xAA, "blocking_send": False}
        self._stack = isotp.CanStack(bus, address=address, params=params)
        self._clock = clock
        self._t0 = clock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="obd-ecu", daemon=True)

    def start(self) -> IsoTpEcu:
        self._stack.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._stack.stop()

    def _serve(self) -> None:
        while not self._stop.is_set():
            request = self._stack.recv(block=True, timeout=0.1)
            if request is None:
                continue
            answer = self.ecu.answer(bytes(request), self._clock() - self._t0)
            if answer is not None:
                self._stack.send(answer)
