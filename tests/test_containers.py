"""What can be checked of the container files and the Grafana dashboard without a container runtime or
a Grafana: the compose file parses, names images that exist (ours built from the Containerfile beside
it) and publishes the ports ``cloud serve`` listens on; the arguments the compose file and the
entrypoint pass are ``cloud serve``'s own; the Containerfile copies paths that exist; every metric the
dashboard queries is one the agent or the coordinator exports."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import yaml

from fleetloop_agent.metrics import AgentMetrics
from fleetloop_cli.cloud_commands import given_flags
from fleetloop_cli.main import build_parser
from fleetloop_cloud.config import CloudConfig, load_cloud_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGING = ROOT / "packaging"
#: Images the compose file may pull: the upstream images it names, by repository.
UPSTREAM = {"postgres", "eclipse-mosquitto"}


def _serve_settings(*argv: str) -> CloudConfig:
    """What `cloud serve ARGV` would run with (flags over the defaults; no configuration file)."""
    return load_cloud_config(None, given_flags(build_parser().parse_args(["cloud", "serve", *argv])))


def test_compose_parses_and_names_images_and_ports_that_exist() -> None:
    doc = yaml.safe_load((PACKAGING / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"coordinator", "postgres", "mosquitto"}
    for name, service in services.items():
        if "build" in service:
            context = (PACKAGING / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
            assert context == ROOT
        else:
            assert service["image"].split(":")[0] in UPSTREAM, name
    defaults = _serve_settings()
    published = {int(p.rsplit(":", 1)[1]) for p in services["coordinator"]["ports"]}
    assert published == {defaults["listen.http_port"], defaults["listen.grpc_port"]}
    assert all(p.startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    # what the coordinator is given is a cloud serve command line (the entrypoint adds the rest)
    entry = (PACKAGING / "container" / "entrypoint.sh").read_text()
    serve = re.search(r"exec fleetloop cloud serve (.*) \$DB_ARGS", entry)
    assert serve is not None
    fixed = shlex.split(serve.group(1).replace('"$DATA"', "/data"))
    args = _serve_settings(
        *fixed,
        "--db",
        services["coordinator"]["environment"]["FLEETLOOP_DB"],
        *services["coordinator"]["command"],
    )
    assert (args["listen.http_port"], args["listen.grpc_port"], args["listen.host"]) == (
        8080,
        50051,
        "0.0.0.0",
    )
    assert args["insecure"]
    db = args["database"]
    assert db.startswith("postgresql://fleetloop:fleetloop@postgres:5432/")
    env = services["postgres"]["environment"]
    assert (
        db
        == f"postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/"
        + env["POSTGRES_DB"]
    )


def test_the_containerfile_copies_what_exists_and_exposes_the_ports() -> None:
    text = (PACKAGING / "container" / "Containerfile").read_text()
    copies = re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, flags=re.MULTILINE)
    assert copies
    for sources in copies:
        for source in sources.split():
            assert (ROOT / source).exists(), source
    expose = re.search(r"^EXPOSE (.*)$", text, flags=re.MULTILINE)
    assert expose is not None
    exposed = {int(p) for p in expose.group(1).split()}
    defaults = _serve_settings()
    assert exposed == {defaults["listen.http_port"], defaults["listen.grpc_port"]}


def _dashboard_metrics() -> set[str]:
    doc = json.loads((PACKAGING / "grafana" / "fleetloop-dashboard.json").read_text())
    assert doc["panels"] and all(p["targets"] for p in doc["panels"])
    names = set()
    for panel in doc["panels"]:
        for target in panel["targets"]:
            names |= set(re.findall(r"\bfleetloop_[a-z_]+", target["expr"]))
    return names


def _exported(registry_names: set[str], name: str) -> bool:
    base = re.sub(r"_(total|bucket|sum|count)$", "", name)
    return name in registry_names or base in registry_names


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    names = _dashboard_metrics()
    agent = {m.name for m in AgentMetrics().registry.collect()}
    agent_names = {n for n in names if n.startswith("fleetloop_agent_")}
    assert agent_names and all(_exported(agent, n) for n in agent_names), agent_names - agent
    coordinator_names = names - agent_names
    assert coordinator_names
    if importlib.util.find_spec("fleetloop_cloud.metrics") is not None:  # the coordinator's /metrics
        metrics = ROOT / "cloud" / "fleetloop_cloud" / "metrics"
        source = "\n".join(p.read_text() for p in metrics.glob("*.py"))
        missing = {n for n in coordinator_names if f'"{re.sub(r"_(total|bucket)$", "", n)}"' not in source}
        assert not missing, missing
