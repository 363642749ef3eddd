"""``model("name", w)``: a real ONNX model built here with onnx's helper API, run by onnxruntime through
the model registry, checked against the same arithmetic in numpy; campaigns that call a model fire, and
a model that is not installed (or asked for another window) refuses the campaign with the reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from fleetloop_agent.models import ModelRegistry, load_model_pack
from fleetloop_agent.ring_buffer import RingBuffers
from fleetloop_agent.trigger_engine import TriggerEngine
from fleetloop_shared.catalog import Catalog, DataType
from fleetloop_shared.errors import ConfigError
from fleetloop_shared.rules import Evaluator, compile_expression, parse_campaign
from fleetloop_shared.samples import GroupBatch

S = 1_000_000_000
MS = 1_000_000
WEIGHTS = np.array([1.0, -0.5], np.float32)


def build_pack(root: Path, *, window: str = "1s", rate: int = 4) -> Path:
    """score = mean over time and inputs of (inputs × [1, -0.5]) — a tiny linear model."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, rate])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n"])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 2, 1], WEIGHTS.tolist())
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["xw"]),
        helper.make_node("ReduceMean", ["xw"], ["score"], axes=[1, 2], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "linear", [x], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    pack = root / "linear"
    pack.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(pack / "model.onnx"))
    (pack / "model.yaml").write_text(
        f"name: linear\nfile: model.onnx\ninputs: [A.speed, A.brake]\nwindow: {window}\n"
        f"sample_rate_hz: {rate}\noutput: score\n"
    )
    return pack


@pytest.fixture
def catalog() -> Catalog:
    cat = Catalog()
    cat.add("A.speed", DataType.FLOAT64)
    cat.add("A.brake", DataType.INT64)
    return cat


def feed(catalog: Catalog) -> tuple[RingBuffers, list[GroupBatch]]:
    t = np.arange(0, 20, dtype=np.int64) * 250 * MS  # 4 Hz, 5 s
    rng = np.random.default_rng(7)
    batches = [
        GroupBatch("speed", t, {1: rng.normal(50, 10, t.shape[0])}),
        GroupBatch("brake", t[::2] + 100 * MS, {2: rng.integers(0, 5, t.shape[0] // 2)}),
    ]
    buffers = RingBuffers(catalog, horizon_ns=3600 * S)
    for b in batches:
        buffers.append(b)
    return buffers, batches


def expected_scores(batches: list[GroupBatch], times: np.ndarray, rate: int) -> list[float | None]:
    """The same model in numpy: held values on the grid t - 1s + k/rate, k = 1..rate."""
    out: list[float | None] = []
    for t in times.tolist():
        rows = []
        for batch in batches:
            (values,) = batch.values.values()
            grid = [t - S + k * (S // rate) for k in range(1, rate + 1)]
            index = np.searchsorted(batch.t_ns, grid, side="right") - 1
            if (index < 0).any():
                rows = []
                break
            rows.append(values[index].astype(np.float32))
        if not rows:
            out.append(None)
            continue
        x = np.stack(rows)[None, :, :]
        out.append(float(np.mean(x * WEIGHTS[None, :, None], axis=(1, 2), dtype=np.float32)[0]))
    return out


def test_scores_match_numpy(tmp_path: Path, catalog: Catalog) -> None:
    build_pack(tmp_path)
    registry = ModelRegistry.from_directory(tmp_path)
    assert registry.names == ["linear"]
    buffers, batches = feed(catalog)
    expression = compile_expression('model("linear", 1s)', catalog=catalog)
    times = np.unique(np.concatenate([b.t_ns for b in batches]))
    # the model's inputs are what the engine reads: here the evaluation times are given directly
    data, valid = Evaluator(expression, registry).evaluate(times, {}, buffers)
    got = [d if ok else None for d, ok in zip(data.tolist(), valid.tolist(), strict=True)]
    want = expected_scores(batches, times, 4)
    assert [g is None for g in got] == [w is None for w in want]
    assert got[0] is None and got[-1] is not None  # before a full grid has values: missing
    for g, w in zip(got, want, strict=True):
        if w is not None:
            assert g == pytest.approx(w, rel=1e-6)


def test_campaign_calling_a_model_fires(tmp_path: Path, catalog: Catalog) -> None:
    build_pack(tmp_path)
    registry = ModelRegistry.from_directory(tmp_path)
    doc = (
        "apiVersion: fleetloop/v1\nkind: Campaign\nmetadata: {name: m, version: 1}\n"
        "spec:\n  trigger: {when: 'model(\"linear\", 1s) > 20', mode: always}\n"
    )
    engine = TriggerEngine(catalog, registry)
    assert engine.set_campaigns([parse_campaign(doc)], 0) == {}
    buffers, batches = feed(catalog)
    fires = engine.process(batches, buffers)
    times = np.unique(np.concatenate([b.t_ns for b in batches]))
    want = [
        t for t, s in zip(times.tolist(), expected_scores(batches, times, 4), strict=True) if s and s > 20
    ]
    assert [f.t_ns for f in fires] == want and want


def test_missing_model_or_wrong_window_refuses_the_campaign(tmp_path: Path, catalog: Catalog) -> None:
    build_pack(tmp_path)
    registry = ModelRegistry.from_directory(tmp_path)

    def doc(name: str, when: str) -> str:
        return (
            f"apiVersion: fleetloop/v1\nkind: Campaign\nmetadata: {{name: {name}, version: 1}}\n"
            f"spec:\n  trigger: {{when: '{when}'}}\n"
        )

    engine = TriggerEngine(catalog, registry)
    refused = engine.set_campaigns(
        [
            parse_campaign(doc("gone", 'model("nope", 1s) > 1')),
            parse_campaign(doc("window", 'model("linear", 2s) > 1')),
        ],
        0,
    )
    assert "not installed" in refused["gone"]
    assert "takes a window of 1s, the rule asks for 2s" in refused["window"]
    assert (
        "not installed"
        in TriggerEngine(catalog).set_campaigns([parse_campaign(doc("x", 'model("linear", 1s) > 1'))], 0)["x"]
    )


def test_bad_packs_are_config_errors(tmp_path: Path) -> None:
    pack = build_pack(tmp_path)
    (pack / "model.yaml").write_text("name: linear\ninputs: []\nwindow: 1s\nsample_rate_hz: 4\n")
    with pytest.raises(ConfigError, match="'inputs' must be"):
        load_model_pack(pack)
    (pack / "model.yaml").write_text("name: linear\ninputs: [A.speed]\nwindow: 1s\nsample_rate_hz: 4\n")
    (pack / "model.onnx").write_bytes(b"not onnx at all")
    broken = load_model_pack(pack)
    with pytest.raises(ConfigError, match="cannot load"):
        broken.session()
