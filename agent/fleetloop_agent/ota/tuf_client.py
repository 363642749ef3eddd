"""The agent's TUF client: python-tuf's ngclient over our HTTP fetcher, for both repositories.

The device is provisioned with two trusted roots (``trusted_release_keys`` in the agent config lists the
coordinator's ``image-root.json`` and ``director-root.json``; each root names its repository in a signed
field). For every job, ngclient refreshes each repository from the job's artifact server: it walks root
rotations (``N.root.json``), then timestamp, snapshot and targets, checking signatures against the
thresholds, version numbers against what this device saw before (kept in ``state_dir``, so rollback and
replay are refused across restarts), expiry against the clock and lengths against its limits. Only then
are the verified targets handed to :func:`fleetloop_shared.update.tuf_metadata.decide_update`, which demands
that the director and the image repository agree.

This module is the only agent user of ``tuf``; every python-tuf error becomes an
:class:`ArtifactVerificationError` (refuse: the device stays where it is) or :class:`UnavailableError`
(the server could not be reached: try again later) with the repository named.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root  # type: ignore[attr-defined]
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig  # type: ignore[attr-defined]

from fleetloop_agent.ota.download import Fetcher
from fleetloop_shared.errors import (
    ArtifactVerificationError,
    ConfigError,
    FleetloopError,
    NotFoundError,
    UnavailableError,
)
from fleetloop_shared.update.artifact import ReleaseManifest
from fleetloop_shared.update.delta_format import FORMATS
from fleetloop_shared.update.tuf_metadata import (
    DIRECTOR_REPOSITORY,
    IMAGE_REPOSITORY,
    REPOSITORY_FIELD,
    Target,
    decide_update,
    target_of,
)

log = logging.getLogger(__name__)

#: Metadata size limits (endless-data defence for metadata; targets are bounded by their signed length).
_CONFIG = UpdaterConfig(
    max_root_rotations=64,
    root_max_length=256 * 1024,
    timestamp_max_length=16 * 1024,
    snapshot_max_length=256 * 1024,
    targets_max_length=4 * 1024 * 1024,
    prefix_targets_with_hash=False,
)


class _NgFetcher(FetcherInterface):
    """ngclient's fetcher seam over the agent's one HTTP client (same timeouts, same error mapping)."""

    def __init__(self, http: Fetcher, max_bytes: int) -> None:
        self._http = http
        self._max = max_bytes

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            yield from self._http.fetch_range(url, 0, self._max)
        except NotFoundError as exc:
            raise tuf_errors.DownloadHTTPError(str(exc), 404) from None
        except FleetloopError as exc:
            raise tuf_errors.DownloadError(str(exc)) from None


def parse_anchors(anchors: Sequence[bytes]) -> dict[str, bytes]:
    """The trusted roots by repository; PEM keys of the old manifest scheme are skipped with a warning.

    ConfigError for a root that is not TUF root metadata or that names no fleetloop repository.
    """
    roots: dict[str, bytes] = {}
    for i, raw in enumerate(anchors):
        if raw.lstrip().startswith(b"-----BEGIN"):
            log.warning(
                "trusted key #%d is a PEM key; OTA now needs the TUF roots (image-root.json, "
                "director-root.json) and ignores it",
                i + 1,
            )
            continue
        try:
            md = Metadata[Root].from_bytes(raw)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError, tuf_errors.RepositoryError) as exc:
            raise ConfigError(f"trusted root #{i + 1} is not TUF root metadata: {exc}") from None
        repo = md.signed.unrecognized_fields.get(REPOSITORY_FIELD)
        if repo not in (IMAGE_REPOSITORY, DIRECTOR_REPOSITORY):
            raise ConfigError(f"trusted root #{i + 1} does not name its repository ({REPOSITORY_FIELD})")
        if repo in roots:
            raise ConfigError(f"two trusted roots for the {repo} repository")
        roots[repo] = raw
    return roots


class TufClient:
    """Verifies update metadata for one device; trusted metadata persists under ``metadata_dir``."""

    def __init__(
        self,
        metadata_dir: Path,
        anchors: Sequence[bytes],
        *,
        device_id: str,
        fetcher: Fetcher,
        max_target_bytes: int,
    ) -> None:
        self._dir = metadata_dir
        self._roots = parse_anchors(anchors)
        self.device_id = device_id
        self._fetcher = _NgFetcher(fetcher, 8 * 1024 * 1024)
        self._max_target = max_target_bytes

    def _updater(self, repository: str, base_url: str) -> Updater:
        anchor = self._roots.get(repository)
        if anchor is None:
            raise ArtifactVerificationError(
                f"no trusted root for the {repository} repository is configured; cannot verify any update"
            )
        local = self._dir / repository
        local.mkdir(parents=True, exist_ok=True)
        # The provisioned root starts the chain only once; after that the newest verified root on disk
        # is the trust anchor (root rotation), and older timestamps/snapshots cannot come back.
        bootstrap = None if (local / "root.json").exists() else anchor
        url = (
            base_url.rstrip("/")
            + "/tuf/"
            + ("image" if repository == IMAGE_REPOSITORY else f"director/{self.device_id}")
        )
        try:
            return Updater(str(local), url, fetcher=self._fetcher, config=_CONFIG, bootstrap=bootstrap)
        except (tuf_errors.RepositoryError, ValueError, OSError) as exc:
            raise ArtifactVerificationError(
                f"{repository} repository: stored trusted root is unusable: {exc}"
            ) from None

    def _refresh(self, repository: str, base_url: str) -> Updater:
        updater = self._updater(repository, base_url)
        try:
            updater.refresh()
        except tuf_errors.ExpiredMetadataError as exc:
            raise ArtifactVerificationError(
                f"{repository} repository: metadata expired (freeze?): {exc}"
            ) from None
        except tuf_errors.BadVersionNumberError as exc:
            raise ArtifactVerificationError(
                f"{repository} repository: rollback of metadata refused: {exc}"
            ) from None
        except tuf_errors.UnsignedMetadataError as exc:
            raise ArtifactVerificationError(
                f"{repository} repository: signatures do not meet the threshold of trusted keys: {exc}"
            ) from None
        except tuf_errors.RepositoryError as exc:
            raise ArtifactVerificationError(f"{repository} repository: metadata refused: {exc}") from None
        except tuf_errors.DownloadLengthMismatchError as exc:
            raise ArtifactVerificationError(f"{repository} repository: metadata too large: {exc}") from None
        except tuf_errors.DownloadError as exc:
            raise UnavailableError(f"{repository} repository unreachable: {exc}") from None
        return updater

    def decide(
        self,
        base_url: str,
        *,
        job_id: str,
        hardware_id: str,
        installed_sha256: str,
        delta_formats: Sequence[str] = FORMATS,
    ) -> ReleaseManifest:
        """The update this job may install, verified by both repositories; raises why not."""
        image = self._refresh(IMAGE_REPOSITORY, base_url)
        director = self._refresh(DIRECTOR_REPOSITORY, base_url)
        d_targets = self._targets_of(director, DIRECTOR_REPOSITORY)
        if len(d_targets) > 8:
            raise ArtifactVerificationError(f"the director lists {len(d_targets)} targets for one device")

        def lookup(path: str) -> Target | None:
            try:
                info = image.get_targetinfo(path)
            except tuf_errors.RepositoryError as exc:
                raise ArtifactVerificationError(f"image repository: {exc}") from None
            if info is None:
                return None
            return target_of(info.path, info.length, info.hashes, info.unrecognized_fields.get("custom"))

        plan = decide_update(
            d_targets,
            lookup,
            device_id=self.device_id,
            hardware_id=hardware_id,
            installed_sha256=installed_sha256,
            job_id=job_id,
            expires_unix=0,
            delta_formats=delta_formats,
        )
        for p in plan.payloads:
            if p.size > self._max_target:
                raise ArtifactVerificationError(
                    f"{p.kind} payload of {p.size} bytes exceeds this device's limit of {self._max_target}"
                )
        return plan

    @staticmethod
    def _targets_of(updater: Updater, repository: str) -> dict[str, Target]:
        # ngclient has verified top-level targets during refresh; the director uses no delegations.
        md = updater._trusted_set.targets
        out: dict[str, Target] = {}
        for path, info in md.targets.items():
            custom = info.unrecognized_fields.get("custom")
            out[path] = target_of(path, info.length, info.hashes, custom)
        return out
