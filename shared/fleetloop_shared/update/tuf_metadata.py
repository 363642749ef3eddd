"""fleetloop's reading of TUF targets: what the image repository and the director say, and when they agree.

Update metadata is TUF (python-tuf) in Uptane's split. The **image repository** (threshold root, release
keys) signs every image and delta the cloud has built, with their hashes and fleetloop facts in each
target's ``custom`` field. The **director** (online keys) signs, per device, the one image this device
should install and the delta for its installed image, tagged with the job id. Either alone may be
compromised; the device installs only what both sign identically (:func:`decide_update`), so a stolen
online director key cannot push arbitrary software and a stolen release key cannot target a device.

Both sides import this module: the cloud to build the ``custom`` fields, the agent to check them. It is
pure (no I/O, no signing): python-tuf's verification happens in the agent's ``tuf_client`` adapter, which
hands the *verified* targets here. Every refusal is an :class:`ArtifactVerificationError` whose message
names the attack it stops.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleetloop_shared.errors import ArtifactVerificationError
from fleetloop_shared.update.artifact import PayloadRef, ReleaseManifest
from fleetloop_shared.update.delta_format import FLDELTA1, FORMATS

#: Signed field in each root saying which repository the root belongs to (a device holds one of each).
REPOSITORY_FIELD = "x-fleetloop-repository"
IMAGE_REPOSITORY = "image"
DIRECTOR_REPOSITORY = "director"
REPOSITORIES = (IMAGE_REPOSITORY, DIRECTOR_REPOSITORY)
#: Key of fleetloop's facts inside a target's ``custom``.
CUSTOM_KEY = "fleetloop"
KIND_IMAGE = "image"
KIND_DELTA = "delta"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE = re.compile(r"files/[0-9a-f]{64}")


@dataclass(frozen=True)
class Target:
    """A verified TUF target as fleetloop reads it: path, length, sha256, and its ``custom`` facts."""

    path: str
    length: int
    sha256: str
    facts: Mapping[str, Any]

    def same_file(self, other: Target) -> bool:
        return self.path == other.path and self.length == other.length and self.sha256 == other.sha256


def image_target_path(name: str, hardware_id: str, version: str) -> str:
    return f"{name}/{hardware_id}/{version}.img"


def delta_target_path(
    name: str, hardware_id: str, version: str, base_sha256: str, algorithm: str = FLDELTA1
) -> str:
    """Where the delta from one base in one format is signed (FLDELTA1 keeps its original path)."""
    stem = f"{name}/{hardware_id}/{version}.from-{base_sha256[:16]}"
    return f"{stem}.delta" if algorithm == FLDELTA1 else f"{stem}.{algorithm}.delta"


def image_facts(
    name: str, version: str, hardware_id: str, file: str, *, algorithm: str = "none", install: str = "slot"
) -> dict[str, Any]:
    return {
        "install": install,
        "kind": KIND_IMAGE,
        "name": name,
        "version": version,
        "hardware_id": hardware_id,
        "file": file,
        "algorithm": algorithm,
    }


def delta_facts(
    image_path: str, base_sha256: str, file: str, *, algorithm: str, methods: str = ""
) -> dict[str, Any]:
    """The signed facts of a delta: which image it builds, from which base, in which container format."""
    return {
        "kind": KIND_DELTA,
        "image": image_path,
        "base_sha256": base_sha256,
        "algorithm": algorithm,
        "methods": methods,
        "file": file,
    }


def _text(facts: Mapping[str, Any], key: str, where: str) -> str:
    value = facts.get(key)
    if not isinstance(value, str) or not value or len(value) > 256 or not value.isprintable():
        raise ArtifactVerificationError(f"{where}: custom field {key!r} is missing or not a short string")
    return value


def _file(facts: Mapping[str, Any], where: str) -> str:
    value = _text(facts, "file", where)
    if not _FILE.fullmatch(value):
        raise ArtifactVerificationError(f"{where}: file {value!r} is not files/<sha256>")
    return value


def decide_update(
    director: Mapping[str, Target],
    image_repository: Callable[[str], Target | None],
    *,
    device_id: str,
    hardware_id: str,
    installed_sha256: str,
    job_id: str,
    expires_unix: int,
    delta_formats: Sequence[str] = FORMATS,
) -> ReleaseManifest:
    """What to install, if the director and the image repository agree; else why not.

    ``director`` is this device's verified director targets; ``image_repository`` looks a path up in the
    verified image repository. The result is the plan the driver journals: the image and the payloads this
    device may use (the full image, plus the delta from ``installed_sha256`` when both repositories sign
    one in a format of ``delta_formats``, the device's, preferred first). Checks: the director names
    exactly one image for this device and this job (replayed old jobs fail here); the image repository
    signs the same path with the same length and hash (mix-and-match, arbitrary software); the image is
    for this hardware. A delta in a format the device does not read is passed over, not refused: the
    full image builds the same target.
    """
    images = [t for t in director.values() if t.facts.get("kind") == KIND_IMAGE]
    if not images:
        raise ArtifactVerificationError(f"the director has no update for device {device_id}")
    if len(images) > 1:
        raise ArtifactVerificationError(f"the director names {len(images)} images for one device")
    d_image = images[0]
    where = f"director target {d_image.path}"
    if d_image.facts.get("device_id") != device_id:
        raise ArtifactVerificationError(
            f"{where} is for device {d_image.facts.get('device_id')!r}, not {device_id}"
        )
    if d_image.facts.get("job_id") != job_id:
        raise ArtifactVerificationError(
            f"job {job_id} is not the director's current job for this device "
            f"({d_image.facts.get('job_id')!r}); replayed or superseded"
        )
    i_image = image_repository(d_image.path)
    if i_image is None:
        raise ArtifactVerificationError(
            f"the image repository does not sign {d_image.path}; refusing unknown software"
        )
    if not i_image.same_file(d_image):
        raise ArtifactVerificationError(
            f"director and image repository disagree on {d_image.path} (length or hash): "
            "mix-and-match refused"
        )
    facts = i_image.facts
    where = f"image target {i_image.path}"
    if facts.get("kind") != KIND_IMAGE:
        raise ArtifactVerificationError(f"{where} is not an image")
    target_hw = _text(facts, "hardware_id", where)
    if target_hw != hardware_id:
        raise ArtifactVerificationError(f"{where} is for hardware {target_hw}, this device is {hardware_id}")
    for key in ("name", "version", "hardware_id", "file"):
        if d_image.facts.get(key) != facts.get(key):
            raise ArtifactVerificationError(
                f"director and image repository disagree on {key} of {i_image.path}"
            )
    payloads = [PayloadRef("full", "none", _file(facts, where), i_image.sha256, i_image.length, None)]
    readable: list[PayloadRef] = []
    for d_delta in director.values():
        if d_delta.facts.get("kind") != KIND_DELTA or d_delta.facts.get("base_sha256") != installed_sha256:
            continue  # a delta for another base: this device gets the full image
        i_delta = image_repository(d_delta.path)
        if i_delta is None or not i_delta.same_file(d_delta) or dict(i_delta.facts) != dict(d_delta.facts):
            raise ArtifactVerificationError(
                f"director and image repository disagree on delta {d_delta.path}: mix-and-match refused"
            )
        dwhere = f"delta target {i_delta.path}"
        if i_delta.facts.get("image") != i_image.path:
            raise ArtifactVerificationError(
                f"{dwhere} builds {i_delta.facts.get('image')!r}, not {i_image.path}"
            )
        algorithm = str(i_delta.facts.get("algorithm"))
        if algorithm not in delta_formats:
            continue  # a format this device does not read: the full image (or another delta) instead
        readable.append(
            PayloadRef(
                "delta",
                algorithm,
                _file(i_delta.facts, dwhere),
                i_delta.sha256,
                i_delta.length,
                installed_sha256,
            )
        )
    if readable:
        payloads.append(min(readable, key=lambda p: list(delta_formats).index(p.algorithm)))
    install = facts.get("install", "slot")
    if install not in ("slot", "swap"):
        raise ArtifactVerificationError(f"{where}: unknown install mode {install!r}")
    return ReleaseManifest(
        install=install,
        name=_text(facts, "name", where),
        version=_text(facts, "version", where),
        hardware_id=target_hw,
        target_sha256=i_image.sha256,
        target_size=i_image.length,
        payloads=tuple(payloads),
        created_unix=0,
        expires_unix=expires_unix,
    )


def target_of(path: str, length: int, hashes: Mapping[str, str], custom: Any) -> Target:
    """A :class:`Target` from a verified TUF TargetFile's fields; refuses targets without a sha256."""
    sha = hashes.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ArtifactVerificationError(f"target {path} has no sha256 hash")
    facts = custom.get(CUSTOM_KEY) if isinstance(custom, dict) else None
    if not isinstance(facts, dict):
        raise ArtifactVerificationError(f"target {path} carries no fleetloop facts")
    return Target(path=path, length=length, sha256=sha, facts=facts)
