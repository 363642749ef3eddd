"""Where the CLI finds its coordinator and credentials: named contexts in one config file, as
kubeconfig has them, overridable by flags and environment variables.

The file (``$FLEETLOOP_CONFIG``, else ``$XDG_CONFIG_HOME/fleetloop/config.yaml``, else
``~/.config/fleetloop/config.yaml``) holds ``current-context`` and ``contexts``, each with ``cloud``
(the coordinator's URL), ``token`` (an API token) and optionally ``ca`` (the CA certificate an
``https`` coordinator's certificate is checked against). It is written with mode 0600: it holds
secrets. Precedence: ``--cloud`` / ``$FLEETLOOP_CLOUD`` over the context's URL; ``$FLEETLOOP_TOKEN``
over its token; ``$FLEETLOOP_CA`` over its CA; ``--context`` / ``$FLEETLOOP_CONTEXT`` over
``current-context``.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fleetloop_shared.errors import ConfigError

DEFAULT_CLOUD = "http://127.0.0.1:8080"
_KEYS = ("cloud", "token", "ca")


def config_path() -> Path:
    explicit = os.environ.get("FLEETLOOP_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fleetloop" / "config.yaml"


@dataclass(frozen=True)
class Target:
    """Where a command talks to and with what: the resolved URL, token and CA."""

    cloud: str
    token: str | None
    ca: Path | None
    context: str | None


def load(path: Path | None = None) -> dict[str, Any]:
    """The config file as a dict (empty when there is none); ConfigError when it cannot be read."""
    path = path or config_path()
    if not path.exists():
        return {"contexts": {}}
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the fleetloop config: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("contexts", {}), dict):
        raise ConfigError(f"{path}: expected a mapping with 'contexts'")
    doc.setdefault("contexts", {})
    for name, ctx in doc["contexts"].items():
        if not isinstance(ctx, dict) or set(ctx) - set(_KEYS):
            raise ConfigError(f"{path}: context {name!r} may have only {', '.join(_KEYS)}")
    return doc


def save(doc: dict[str, Any], path: Path | None = None) -> Path:
    """Write the config atomically, readable by its owner only."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o600)
            yaml.safe_dump(doc, fh, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve(cloud_flag: str | None, context_flag: str | None) -> Target:
    """The target of a command from its flags, the environment and the config file."""
    doc = load()
    name = context_flag or os.environ.get("FLEETLOOP_CONTEXT") or doc.get("current-context")
    ctx: dict[str, Any] = {}
    if name:
        if name not in doc["contexts"]:
            known = ", ".join(sorted(doc["contexts"])) or "none"
            raise ConfigError(f"no context {name!r} in {config_path()} (contexts: {known})")
        ctx = doc["contexts"][name]
    cloud = cloud_flag or os.environ.get("FLEETLOOP_CLOUD") or ctx.get("cloud") or DEFAULT_CLOUD
    token = os.environ.get("FLEETLOOP_TOKEN") or ctx.get("token") or None
    ca = os.environ.get("FLEETLOOP_CA") or ctx.get("ca") or None
    return Target(str(cloud), token, Path(ca) if ca else None, name)
