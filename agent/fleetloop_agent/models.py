"""Model packs: ONNX models that trigger rules call as ``model("name", w)``.

A model pack is a directory with a manifest ``model.yaml`` and an ONNX file::

    name: brake-anomaly
    file: model.onnx
    inputs: [Vehicle.Speed, Vehicle.Chassis.Brake]   # catalog paths, in the order the model expects
    window: 2s                                       # the w of model("brake-anomaly", 2s)
    sample_rate_hz: 10                               # the grid the inputs are resampled on
    output: score                                    # optional: output name (default: the first)

At each evaluation time t the inputs' held values (sample and hold, as everywhere in the rule language)
are read on the grid ``t - w + k / rate`` for ``k = 1 .. w * rate`` and fed as one float32 tensor of
shape ``[evaluations, inputs, steps]`` (all evaluation times of a batch in one call); the output's first
element per row is the score. A grid point without a value (no sample yet, NaN) makes that score
missing, and so does an inference failure (counted in ``inference_errors_total``): a model never takes
the agent down.

This module is the only one that imports onnxruntime, lazily, when a model is first scored; its errors
are mapped to :class:`~fleetloop_shared.errors.ConfigError` (a pack that cannot load) here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from fleetloop_shared.errors import ConfigError, FleetloopError, NotFoundError
from fleetloop_shared.rules import WindowSource
from fleetloop_shared.rules.durations import format_duration, parse_duration

#: Largest input a pack may declare (signals × steps per evaluation); bounds memory per batch.
MAX_INPUT_VALUES = 65_536
#: Evaluation times scored per onnxruntime call; a batch with more is scored in chunks of this size.
MAX_BATCH_ROWS = 4096
MANIFEST = "model.yaml"


@dataclass
class ModelPack:
    """One installed model: its manifest and (once used) its onnxruntime session."""

    name: str
    path: Path
    inputs: tuple[str, ...]
    window_ns: int
    sample_rate_hz: float
    output: str | None = None
    _session: Any = field(default=None, repr=False)

    @property
    def steps(self) -> int:
        return max(1, round(self.window_ns * self.sample_rate_hz / 1e9))

    def session(self) -> Any:
        """The onnxruntime session (onnxruntime is imported here, on first use)."""
        if self._session is None:
            try:
                import onnxruntime  # type: ignore[import-untyped]
            except ImportError as exc:  # pragma: no cover - declared dependency
                raise ConfigError(f"model {self.name!r}: onnxruntime is not available ({exc})") from None
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            try:
                self._session = onnxruntime.InferenceSession(
                    str(self.path), options, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # onnxruntime raises its own exception types; map them all
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ConfigError(f"model {self.name!r}: cannot load {self.path}: {reason}") from None
        return self._session


def load_model_pack(directory: Path) -> ModelPack:
    """Read ``directory/model.yaml``; ConfigError naming the field that is wrong."""
    manifest = Path(directory) / MANIFEST
    if not manifest.is_file():
        raise NotFoundError(f"{manifest}: no such file")
    try:
        doc = yaml.safe_load(manifest.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{manifest}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{manifest}: expected a mapping")
    unknown = set(doc) - {"name", "file", "inputs", "window", "sample_rate_hz", "output"}
    if unknown:
        raise ConfigError(f"{manifest}: unknown field {sorted(unknown)[0]!r}")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{manifest}: 'name' must be a non-empty string")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) and i for i in inputs):
        raise ConfigError(f"{manifest}: 'inputs' must be a non-empty list of signal paths")
    try:
        window_ns = parse_duration(str(doc.get("window", "")))
    except FleetloopError as exc:
        raise ConfigError(f"{manifest}: window: {exc}") from None
    rate = doc.get("sample_rate_hz")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
        raise ConfigError(f"{manifest}: 'sample_rate_hz' must be a positive number")
    file = doc.get("file", "model.onnx")
    path = Path(directory) / str(file)
    if not path.is_file():
        raise ConfigError(f"{manifest}: model file {path} not found")
    output = doc.get("output")
    pack = ModelPack(name, path, tuple(inputs), window_ns, float(rate), str(output) if output else None)
    if window_ns <= 0 or pack.steps * len(inputs) > MAX_INPUT_VALUES:
        raise ConfigError(f"{manifest}: window × rate × inputs must be between 1 and {MAX_INPUT_VALUES}")
    return pack


class ModelRegistry:
    """The model packs installed on a device; the trigger engine's ``ModelScorer``."""

    def __init__(self, packs: Sequence[ModelPack] = ()) -> None:
        self._packs: dict[str, ModelPack] = {}
        for pack in packs:
            if pack.name in self._packs:
                raise ConfigError(f"model {pack.name!r} is installed twice")
            self._packs[pack.name] = pack
        #: Batches whose inference failed (their scores are missing).
        self.inference_errors_total = 0

    @classmethod
    def from_directory(cls, root: Path) -> ModelRegistry:
        """Every ``root/*/model.yaml`` pack."""
        return cls([load_model_pack(d) for d in sorted(Path(root).iterdir()) if (d / MANIFEST).is_file()])

    @property
    def names(self) -> list[str]:
        return sorted(self._packs)

    def version_of(self, name: str) -> Path | None:
        """The installed model file of ``name`` (a versioned path for a bundle), or None."""
        pack = self._packs.get(name)
        return pack.path if pack is not None else None

    def replace(self, packs: Sequence[ModelPack]) -> set[str]:
        """Make ``packs`` the installed set, in place; returns the names added, removed or changed.

        In place because every running evaluator holds this registry: after the call they all score
        with the new packs. A pack that did not change (same file, same manifest) keeps its loaded
        onnxruntime session, so a reload costs nothing for the models it does not touch.
        """
        fresh: dict[str, ModelPack] = {}
        for pack in packs:
            if pack.name in fresh:
                raise ConfigError(f"model {pack.name!r} is installed twice")
            fresh[pack.name] = pack
        changed = set(self._packs) ^ set(fresh)
        for name, pack in fresh.items():
            old = self._packs.get(name)
            if old is None:
                continue
            if _identity(old) == _identity(pack):
                fresh[name] = old
            else:
                changed.add(name)
        self._packs = fresh
        return changed

    def inputs(self, name: str, window_ns: int) -> Sequence[str]:
        pack = self._packs.get(name)
        if pack is None:
            raise NotFoundError(f"model {name!r} is not installed on this device")
        if window_ns != pack.window_ns:
            raise ConfigError(
                f"model {name!r} takes a window of {format_duration(pack.window_ns)}, "
                f"the rule asks for {format_duration(window_ns)}"
            )
        return pack.inputs

    def grid(
        self, pack: ModelPack, t_ns: npt.NDArray[np.int64], history: WindowSource
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
        """The model input ``[len(t_ns), inputs, steps]`` and which rows are complete."""
        steps = pack.steps
        offsets = pack.window_ns - np.round(np.arange(1, steps + 1) * (1e9 / pack.sample_rate_hz)).astype(
            np.int64
        )
        points = t_ns[:, None] - offsets[None, :]  # [n, steps], last column = t
        data = np.zeros((t_ns.shape[0], len(pack.inputs), steps), np.float32)
        ok = np.ones(t_ns.shape[0], np.bool_)
        start = int(points.min()) - pack.window_ns - 3_600_000_000_000
        for i, path in enumerate(pack.inputs):
            ht, hv = history.samples(path, start, int(t_ns[-1]))
            index = np.searchsorted(np.asarray(ht), points, side="right") - 1
            values = np.asarray(hv, np.float64)
            have = index >= 0
            picked = np.where(have, values[np.maximum(index, 0)] if values.shape[0] else 0.0, np.nan)
            ok &= np.all(np.isfinite(picked), axis=1)
            data[:, i, :] = np.where(np.isfinite(picked), picked, 0.0)
        return data, ok

    def score(
        self, name: str, t_ns: npt.NDArray[np.int64], window_ns: int, history: WindowSource
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        n = int(t_ns.shape[0])
        scores = np.zeros(n)
        valid = np.zeros(n, np.bool_)
        pack = self._packs.get(name)
        if pack is None or n == 0:
            return scores, valid
        data, ok = self.grid(pack, t_ns, history)
        try:
            session = pack.session()
            feed_name = session.get_inputs()[0].name
            output = [pack.output] if pack.output else None
            for lo in range(0, n, MAX_BATCH_ROWS):
                hi = min(n, lo + MAX_BATCH_ROWS)
                result = session.run(output, {feed_name: data[lo:hi]})[0]
                flat = np.asarray(result, np.float64).reshape(hi - lo, -1)[:, 0]
                scores[lo:hi] = flat
                valid[lo:hi] = True
        except Exception:  # inference of one batch failed: its scores are missing, counted
            self.inference_errors_total += 1
            return np.zeros(n), np.zeros(n, np.bool_)
        return scores, valid & ok & np.isfinite(scores)


def _identity(pack: ModelPack) -> tuple[object, ...]:
    """What makes two loads of a pack the same model: the resolved file, its size and mtime, the manifest."""
    path = pack.path.resolve()
    try:
        st = path.stat()
        stamp: tuple[int, int] = (st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = (-1, -1)
    return (path, stamp, pack.inputs, pack.window_ns, pack.sample_rate_hz, pack.output)


def registry_of(packs: Mapping[str, ModelPack]) -> ModelRegistry:
    """A registry over already-loaded packs (tests, the CLI)."""
    return ModelRegistry(list(packs.values()))
