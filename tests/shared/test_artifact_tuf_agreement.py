"""``decide_update``: the device installs only what the director and the image repository both sign."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetloop_shared.errors import ArtifactVerificationError
from fleetloop_shared.update.delta_format import FLDELTA1, FLDELTA2
from fleetloop_shared.update.tuf_metadata import (
    Target,
    decide_update,
    delta_facts,
    delta_target_path,
    image_facts,
    image_target_path,
)

HW, DEV, JOB = "gen1", "dev-1", "job-9"
SHA = st.text("0123456789abcdef", min_size=64, max_size=64)


def repos(
    image_sha: str, delta_sha: str, base: str, size: int
) -> tuple[dict[str, Target], dict[str, Target]]:
    path = image_target_path("fw", HW, "2.0.0")
    facts = image_facts("fw", "2.0.0", HW, f"files/{image_sha}")
    dpath = delta_target_path("fw", HW, "2.0.0", base, FLDELTA2)
    dfacts = delta_facts(path, base, f"files/{delta_sha}", algorithm=FLDELTA2, methods="streams")
    image_repo = {path: Target(path, size, image_sha, facts), dpath: Target(dpath, 77, delta_sha, dfacts)}
    director = {
        path: Target(path, size, image_sha, {**facts, "device_id": DEV, "job_id": JOB, "rollout_id": "r"}),
        dpath: Target(dpath, 77, delta_sha, dfacts),
    }
    return director, image_repo


def decide(
    director: dict[str, Target],
    image_repo: dict[str, Target],
    installed: str,
    formats: tuple[str, ...] = (FLDELTA2,),
) -> object:
    return decide_update(
        director, image_repo.get, device_id=DEV, hardware_id=HW, installed_sha256=installed, job_id=JOB,
        expires_unix=0, delta_formats=formats,
    )  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(image_sha=SHA, delta_sha=SHA, base=SHA, size=st.integers(1, 1 << 40))
def test_agreement_gives_the_delta_for_the_installed_base_else_the_full_image(
    image_sha: str, delta_sha: str, base: str, size: int
) -> None:
    director, image_repo = repos(image_sha, delta_sha, base, size)
    plan = decide(director, image_repo, base)
    assert plan.target_sha256 == image_sha and plan.target_size == size  # type: ignore[attr-defined]
    kinds = [(p.kind, p.sha256) for p in plan.payloads]  # type: ignore[attr-defined]
    assert kinds == [("full", image_sha), ("delta", delta_sha)]
    other = decide(director, image_repo, "f" * 64 if base != "f" * 64 else "e" * 64)
    assert [p.kind for p in other.payloads] == ["full"]  # type: ignore[attr-defined]


FIELD = st.sampled_from(["length", "sha", "hardware", "job", "device", "version", "file", "unknown-path"])


@settings(max_examples=80, deadline=None)
@given(image_sha=SHA, base=SHA, field=FIELD, side=st.sampled_from(["director", "image"]))
def test_any_single_disagreement_is_refused(image_sha: str, base: str, field: str, side: str) -> None:
    director, image_repo = repos(image_sha, "1" * 64, base, 1000)
    path = image_target_path("fw", HW, "2.0.0")
    repo = director if side == "director" else image_repo
    t = repo[path]
    facts = dict(t.facts)
    length, sha, tpath = t.length, t.sha256, t.path
    if field == "length":
        length += 1
    elif field == "sha":
        sha = ("0" if sha[0] != "0" else "1") + sha[1:]
    elif field == "hardware":
        facts["hardware_id"] = "gen2"
    elif field == "job":
        facts["job_id"] = "job-old" if side == "director" else facts.get("job_id")
    elif field == "device":
        facts["device_id"] = "dev-2" if side == "director" else facts.get("device_id")
    elif field == "version":
        facts["version"] = "9.9.9"
    elif field == "file":
        facts["file"] = "files/" + "2" * 64
    else:
        tpath = image_target_path("fw", HW, "6.6.6")
    if side == "image" and field in ("job", "device"):
        return  # the image repository carries no job or device: nothing to disagree on
    del repo[path]
    repo[tpath] = Target(tpath, length, sha, facts)
    with pytest.raises(ArtifactVerificationError):
        decide(director, image_repo, base)


def test_a_delta_for_another_image_is_refused_and_one_in_an_unread_format_passed_over() -> None:
    director, image_repo = repos("a" * 64, "b" * 64, "c" * 64, 10)
    dpath = delta_target_path("fw", HW, "2.0.0", "c" * 64, FLDELTA2)

    def changed(change: dict[str, str]) -> tuple[dict[str, Target], dict[str, Target]]:
        facts = {**image_repo[dpath].facts, **change}
        target = Target(dpath, 77, "b" * 64, facts)
        return {**director, dpath: target}, {**image_repo, dpath: target}

    with pytest.raises(ArtifactVerificationError, match="builds 'fw/gen1/3\\.0\\.0\\.img'"):
        decide(*changed({"image": "fw/gen1/3.0.0.img"}), "c" * 64)
    # a format the device does not read: the full image builds the same target
    plan = decide(*changed({"algorithm": "xdelta3"}), "c" * 64, (FLDELTA2, FLDELTA1))
    assert [p.kind for p in plan.payloads] == ["full"]  # type: ignore[attr-defined]
    plan = decide(director, image_repo, "c" * 64, (FLDELTA1,))
    assert [p.kind for p in plan.payloads] == ["full"]  # type: ignore[attr-defined]


def test_of_two_deltas_the_device_takes_its_preferred_format() -> None:
    director, image_repo = repos("a" * 64, "b" * 64, "c" * 64, 10)
    path = image_target_path("fw", HW, "2.0.0")
    v1path = delta_target_path("fw", HW, "2.0.0", "c" * 64)
    assert v1path == "fw/gen1/2.0.0.from-cccccccccccccccc.delta"  # FLDELTA1 keeps the path old agents know
    v1 = Target(v1path, 99, "d" * 64, delta_facts(path, "c" * 64, "files/" + "d" * 64, algorithm=FLDELTA1))
    director[v1path] = image_repo[v1path] = v1
    for formats, chosen in (
        ((FLDELTA2, FLDELTA1), FLDELTA2),
        ((FLDELTA1, FLDELTA2), FLDELTA1),
        ((FLDELTA1,), FLDELTA1),
    ):
        plan = decide(director, image_repo, "c" * 64, formats)
        assert [(p.kind, p.algorithm) for p in plan.payloads] == [("full", "none"), ("delta", chosen)]  # type: ignore[attr-defined]
