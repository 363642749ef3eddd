"""A model pack delivered as an OTA bundle reaches a running ``model()`` rule, with no restart.

Everything is real and in one process: a coordinator (gRPC + HTTP, TUF repositories, rollout
controller), an agent runtime provisioned with firmware-sim replaying the real recordings, ONNX models
built with onnx's helper API and run by onnxruntime. The model packs are uploaded as tar bundles and
rolled out like firmware; the agent installs them by an atomic ``current`` switch, and its main loop
reloads the model registry: a campaign refused for want of the model starts, a new version of the model
replaces the old one under the running rule, and a campaign that calls no model keeps its state.
"""

from __future__ import annotations

import io
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from fleetloop_agent.config import load_agent_config
from fleetloop_agent.models import ModelRegistry, load_model_pack
from fleetloop_agent.runtime import AgentRuntime
from fleetloop_cloud.grpc_api import start_grpc_server
from fleetloop_cloud.http_api import start_http_server
from fleetloop_cloud.ota.artifact_store import ReleaseInput
from fleetloop_cloud.server import Coordinator
from fleetloop_cloud.services.access import Caller
from fleetloop_fwsim import profiles
from tests.fixtures.agent_runtime import TEST_CAR as DEVICE
from tests.fixtures.agent_runtime import TEST_HW as HW
from tests.fixtures.agent_runtime import provision_test_car, wait_for
from tests.fixtures.tar_bundle import ustar

MODEL = "speedscore"


def model_pack(score: float) -> bytes:
    """A model pack bundle (tar of model.yaml + model.onnx) whose model scores ``0 × speed + score``.

    The input is really read (Vehicle.Speed on a 1 s window at 4 Hz): a grid point without a value
    makes the score missing, exactly as for any model; only the weight makes the score a constant, so
    the test can tell the versions apart by the campaigns they make fire.
    """
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 4])
    y = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["n"])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 1, 1], [0.0])
    b = helper.make_tensor("b", TensorProto.FLOAT, [], [score])
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["xw"]),
        helper.make_node("ReduceMean", ["xw"], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Add", ["mean", "b"], ["score"]),
    ]
    graph = helper.make_graph(nodes, "constant", [x], [y], initializer=[w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    files = {
        "model.yaml": (
            f"name: {MODEL}\nfile: model.onnx\ninputs: [Vehicle.Speed]\nwindow: 1s\n"
            "sample_rate_hz: 4\noutput: score\n"
        ).encode(),
        "model.onnx": model.SerializeToString(),
    }
    return ustar(files)


def campaign(name: str, when: str) -> str:
    return (
        f"apiVersion: fleetloop/v1\nkind: Campaign\nmetadata: {{name: {name}, version: 1}}\n"
        f"spec:\n  trigger: {{when: '{when}', mode: always, min_interval: 1s}}\n"
        "  collect: {signals: [Vehicle.Speed]}\n  upload: {network: [wifi, cellular]}\n"
    )


def captures(coordinator: Coordinator, name: str) -> int:
    rows = coordinator.queries.sql(
        Caller.local(),
        f"SELECT count(DISTINCT capture_id) FROM samples WHERE device_id = '{DEVICE}' "
        f"AND campaign = '{name}'",
    ).rows
    return int(rows[0][0])


def roll_out(coordinator: Coordinator, version: str, score: float) -> None:
    local = Caller.local()
    coordinator.releases.upload(
        local,
        ReleaseInput(
            model_pack(score), name="speedscore-pack", version=version, hardware_id=HW, now=time.time()
        ),
    )
    policy = {"release_version": version, "phases": [{"name": "all", "percent": 100}]}
    rid = coordinator.rollouts.create(local, policy, time.time()).id
    status: list[Any] = []

    def done() -> bool:
        status[:] = [coordinator.rollouts.status(local, rid)]
        return bool(status[0].state in ("SUCCEEDED", "PAUSED", "ABORTED"))

    assert wait_for(done, 60), status
    assert status[0].state == "SUCCEEDED", status


def test_a_model_pack_bundle_reaches_the_running_rule_without_a_restart(
    tmp_path: Path, recordings: Path
) -> None:
    coordinator = Coordinator(tmp_path / "cloud")
    gserver, gport = start_grpc_server(coordinator, "127.0.0.1", 0)
    hserver, hport = start_http_server(coordinator, "127.0.0.1", 0)
    coordinator.jobs.artifact_base_url = f"http://127.0.0.1:{hport}"
    coordinator.start()
    keys = tmp_path / "cloud" / "keys"
    cfg = provision_test_car(tmp_path / "dev", recordings, f"127.0.0.1:{gport}", keys)
    config = load_agent_config(cfg)
    assert len(config.trusted_release_keys) == 2
    # the default campaign (no model) and two that call the model: "one" fires on v1's score 1.0,
    # "two" on v2's score 2.0
    for document in (
        profiles.default_campaign("car"),
        campaign("model-one", f'model("{MODEL}", 1s) > 0.5 and model("{MODEL}", 1s) < 1.5'),
        campaign("model-two", f'model("{MODEL}", 1s) > 1.5'),
    ):
        coordinator.campaigns.apply(Caller.local(), document, now=time.time())
    runtime = AgentRuntime(config)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(runtime.run()), daemon=True)
    thread.start()
    slot = runtime.platform.booted_slot()
    try:
        # before the model is installed: refused with the reason, told to the cloud
        refusal = f"model {MODEL!r} is not installed on this device"
        assert wait_for(lambda: runtime.refused.get("model-one") == refusal, 30), runtime.refused
        assert runtime.refused.get("model-two") == refusal
        assert wait_for(
            lambda: (
                (d := coordinator.repositories.devices.get(DEVICE)) is not None
                and d.campaigns_refused.get("model-one") == refusal
            ),
            30,
        )
        braking = runtime.engine._running["harsh-braking"]

        # v1 arrives as a bundle: the refused campaigns are retried and start; v1's score fires "one"
        roll_out(coordinator, "1.1.0", 1.0)
        assert wait_for(lambda: set(runtime.engine.active) >= {"model-one", "model-two"}, 30), runtime.refused
        assert not runtime.refused
        pack = runtime.models.version_of(MODEL)
        assert pack is not None and pack.parent.name == "v-1.1.0"
        assert wait_for(lambda: captures(coordinator, "model-one") > 0, 60)
        assert captures(coordinator, "model-two") == 0
        one_v1 = runtime.engine._running["model-one"]

        # v2: the running rules now score with v2 (2.0): "two" fires, "one" stops
        roll_out(coordinator, "1.2.0", 2.0)
        assert wait_for(
            lambda: (p := runtime.models.version_of(MODEL)) is not None and p.parent.name == "v-1.2.0", 30
        )
        assert wait_for(lambda: captures(coordinator, "model-two") > 0, 60)
        assert wait_for(lambda: runtime.store.stats().segments_pending == 0, 30)
        ones = captures(coordinator, "model-one")
        twos = captures(coordinator, "model-two")
        assert wait_for(lambda: captures(coordinator, "model-two") > twos, 60)
        assert wait_for(lambda: runtime.store.stats().segments_pending == 0, 30)
        assert captures(coordinator, "model-one") == ones  # v1's score no longer drives any rule

        # the campaign calling the changed model was restarted with it; the others kept their state
        assert runtime.engine._running["model-one"] is not one_v1
        assert runtime.engine._running["harsh-braking"] is braking
        # no restart, no reboot: the same runtime is still running, on the same slot, same firmware
        assert thread.is_alive() and not result
        assert runtime.platform.booted_slot() == slot and runtime.ota.installed_version() == "1.0.0"
    finally:
        runtime.stop()
        thread.join(timeout=20)
        coordinator.stop()
        gserver.stop(grace=0).wait(2)
        hserver.shutdown()
    assert result == [0]


def test_models_dir_packs_load_at_start_and_a_broken_one_is_left_out(
    tmp_path: Path, recordings: Path
) -> None:
    """``models_dir`` packs are there before any cloud; a pack that cannot load is logged and left out."""
    keys = tmp_path / "cloud" / "keys"
    Coordinator(tmp_path / "cloud")  # only for its TUF roots
    cfg = provision_test_car(tmp_path / "dev", recordings, "127.0.0.1:9", keys, models_dir="models")
    models = tmp_path / "dev" / "models"
    with tarfile.open(fileobj=io.BytesIO(model_pack(1.0))) as tar:
        tar.extractall(models / "good", filter="data")
    (models / "broken").mkdir()
    (models / "broken" / "model.yaml").write_text(
        "name: broken\nfile: model.onnx\ninputs: [Vehicle.Speed]\nwindow: 1s\nsample_rate_hz: 4\n"
    )
    (models / "broken" / "model.onnx").write_bytes(b"not onnx at all")
    config = load_agent_config(cfg)
    assert config.models_dir == models
    runtime = AgentRuntime(config)
    try:
        assert runtime.models.names == [MODEL]
        assert runtime.models.inputs(MODEL, 1_000_000_000) == ("Vehicle.Speed",)
    finally:
        runtime.store.close()


def test_replacing_the_registry_reports_only_the_packs_that_changed(tmp_path: Path) -> None:
    """The reload's diff: an unchanged pack keeps its loaded session; a new version, an added or a
    removed model is reported, so only the campaigns calling it are restarted."""
    for name, score in (("v1", 1.0), ("v2", 2.0)):
        with tarfile.open(fileobj=io.BytesIO(model_pack(score))) as tar:
            tar.extractall(tmp_path / name, filter="data")
    v1 = load_model_pack(tmp_path / "v1")
    registry = ModelRegistry()
    assert registry.replace([v1]) == {MODEL}
    session = v1.session()
    again = load_model_pack(tmp_path / "v1")
    assert registry.replace([again]) == set()
    assert registry.version_of(MODEL) == v1.path and v1.session() is session  # the loaded one is kept
    assert registry.replace([load_model_pack(tmp_path / "v2")]) == {MODEL}
    assert registry.version_of(MODEL) == tmp_path / "v2" / "model.onnx"
    assert registry.replace([]) == {MODEL} and registry.names == []
