"""A CAN source's groups carry exactly cantools' values, under the catalog's types: plain messages straight
from the batch decoder's flat result, multiplexed ones split by the signals their frames carry (frames
whose page selects nothing refused and counted, as cantools refuses them), IEEE floats and 64-bit fields
cast where the catalog types them differently (unsigned 64-bit fields are FLOAT64 there), signals nobody
mapped left out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fleetloop_agent.sources.base import GroupAccumulator
from fleetloop_agent.sources.can_signals import CanSignalMap
from fleetloop_shared.can_batch import FrameBatch
from fleetloop_shared.catalog import Catalog
from fleetloop_shared.dbc import load_dbc

DBC = """VERSION ""

NS_ :

BS_:

BU_: ECU

BO_ 256 PLAIN: 8 ECU
 SG_ Speed : 0|16@1+ (0.01,0) [0|655.35] "km/h" ECU
 SG_ Gear : 16|4@1+ (1,0) [0|15] "" ECU
 SG_ Temp : 31|8@0- (1,-40) [-168|87] "degC" ECU
 SG_ Unmapped : 40|8@1+ (1,0) [0|255] "" ECU

BO_ 512 MUXED: 8 ECU
 SG_ Page M : 0|4@1+ (1,0) [0|15] "" ECU
 SG_ Volts m1 : 8|16@1+ (0.001,0) [0|65.535] "V" ECU
 SG_ Amps m2 : 8|16@1- (0.1,0) [-3276.8|3276.7] "A" ECU
 SG_ Count : 56|8@1+ (1,0) [0|255] "" ECU

BO_ 768 WIDE: 8 ECU
 SG_ Odo : 0|64@1+ (1,0) [0|0] "m" ECU

BO_ 1024 FLOATY: 8 ECU
 SG_ Level : 0|32@1- (1,0) [0|0] "" ECU
 SG_ Scaled : 32|16@1+ (2,5) [0|0] "" ECU

SIG_VALTYPE_ 1024 Level : 1;
"""


def _frames() -> FrameBatch:
    rng = np.random.default_rng(7)
    ids, payloads = [], []
    for k in range(400):
        frame_id = [256, 512, 768, 1024, 99][k % 5]
        data = bytearray(rng.integers(0, 256, 8, dtype=np.uint8).tobytes())
        if frame_id == 512:
            data[0] = (data[0] & 0xF0) | [1, 2, 3][k % 3]  # page 3 selects nothing: cantools refuses it
        ids.append(frame_id)
        payloads.append(bytes(data))
    return FrameBatch.from_payloads(np.arange(len(ids)) * 1000, ids, payloads)


def _groups(signals: CanSignalMap, catalog: Catalog, batch: FrameBatch) -> dict[str, dict[str, Any]]:
    out = GroupAccumulator()
    signals.emit(batch, 5, out)
    names = {s.id: s.path for s in catalog}
    return {
        b.group: {"t": b.t_ns.tolist(), **{names[k]: v for k, v in b.values.items()}} for b in out.build()
    }


def test_groups_carry_cantools_values_in_catalog_types(tmp_path: Path) -> None:
    path = tmp_path / "mix.dbc"
    path.write_text(DBC)
    dbc = load_dbc(path)
    mapping = {
        "PLAIN.Speed": "Vehicle.Speed",
        "PLAIN.Gear": "Vehicle.Gear",
        "PLAIN.Temp": "Vehicle.Temp",
        "MUXED.Volts": "Pack.Volts",
        "MUXED.Amps": "Pack.Amps",
        "MUXED.Count": "Pack.Count",
        "WIDE.Odo": "Vehicle.Odo",
        "FLOATY.Level": "Tank.Level",
        "FLOATY.Scaled": "Tank.Scaled",
    }
    signals = CanSignalMap(dbc, mapping, include_unmapped=False, source="car")
    catalog = Catalog()
    signals.declare(catalog)
    batch = _frames()
    groups = _groups(signals, catalog, batch)
    assert set(groups) == {
        "car/PLAIN",
        "car/MUXED/Volts",
        "car/MUXED/Amps",
        "car/WIDE",
        "car/FLOATY",
    }
    reference = dbc.decoder(dbc.message_names())
    seen: dict[str, int] = {}
    for group, columns in groups.items():
        for path_name, column in columns.items():
            if path_name == "t":
                continue
            declared = catalog.by_path(path_name).data_type
            assert column.dtype == np.dtype(declared.numpy_dtype), (group, path_name)
        message = group.split("/")[1]
        for k, t in enumerate(columns["t"]):
            row = (t - 5) // 1000
            name, want = reference.decode(int(batch.frame_id[row]), batch.payload[row].tobytes())
            assert name == message
            for key, path_name in mapping.items():
                if key.startswith(message + ".") and path_name in columns:
                    signal = key.split(".", 1)[1]
                    column = columns[path_name]
                    have, expected = column[k].item(), np.array(want[signal]).astype(column.dtype).item()
                    assert have == expected or (have != have and expected != expected), (group, signal)
                    seen[path_name] = seen.get(path_name, 0) + 1
            carried = {key.split(".", 1)[1] for key, p in mapping.items() if p in columns}
            assert carried == {s for s in want if f"{message}.{s}" in mapping}, (group, want)
    assert set(seen) == set(mapping.values())
    assert "CAN.PLAIN.Unmapped" not in catalog
    for row in range(len(batch)):
        reference.decode(int(batch.frame_id[row]), batch.payload[row].tobytes())
    assert signals.decode_errors_total == reference.errors_total > 0
