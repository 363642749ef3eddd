"""The u-boot adapter: our reader/writer of u-boot's environment against the real fw_printenv/fw_setenv."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fleetloop_agent.ota.platform import UBootEnvStore, UBootPlatform
from fleetloop_fwsim.firmware import build_image
from fleetloop_shared.errors import ConfigError, IntegrityError

SIZE = 0x4000


@pytest.fixture(autouse=True)
def uboot_tools() -> None:
    """The real tools are part of the test setup (scripts/system-deps.sh, run by ``make test``): a
    machine without them fails here, loudly, instead of skipping the only interoperability check."""
    missing = [tool for tool in ("fw_printenv", "fw_setenv") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: install libubootenv-tool (scripts/system-deps.sh)")


def config(tmp_path: Path) -> Path:
    cfg = tmp_path / "fw_env.config"
    cfg.write_text(f"# device offset size\n{tmp_path / 'env.bin'} 0x0 {SIZE:#x}\n")
    return cfg


def printenv(cfg: Path) -> dict[str, str]:
    out = subprocess.run(["fw_printenv", "-c", str(cfg)], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_what_we_write_fw_printenv_reads_and_what_fw_setenv_writes_we_read(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = UBootEnvStore.from_fw_env_config(cfg)
    assert (store.device, store.offset, store.size) == (tmp_path / "env.bin", 0, SIZE)
    env = {
        "boot_slot": "a",
        "upgrade_available": "0",
        "bootcount": "0",
        "bootlimit": "3",
        "bootargs": "a b=c",
    }
    store.write(env)
    assert printenv(cfg) == env
    subprocess.run(["fw_setenv", "-c", str(cfg), "bootcount", "2"], check=True)
    subprocess.run(["fw_setenv", "-c", str(cfg), "bootargs"], check=True)  # no value: delete
    got = store.read()
    assert got == {**{k: v for k, v in env.items() if k != "bootargs"}, "bootcount": "2"}


def test_the_platform_switches_and_commits_through_the_uboot_env(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    store = UBootEnvStore.from_fw_env_config(cfg)
    store.write({"boot_slot": "a", "bootlimit": "2"})
    slots = {"a": tmp_path / "a.img", "b": tmp_path / "b.img"}
    slots["a"].write_bytes(build_image("1.0.0", "hw", size_hint=4096))
    (tmp_path / "booted").write_text("a\n")
    platform = UBootPlatform(slots, store, tmp_path / "booted")
    assert platform.boot_env()["upgrade_available"] == "0"  # defaults fill what u-boot has not set
    platform.write_slot("b", build_image("2.0.0", "hw", size_hint=4096))
    platform.set_next_boot("b")
    env = printenv(cfg)
    assert (env["boot_slot"], env["upgrade_available"], env["bootcount"]) == ("b", "1", "0")
    (tmp_path / "booted").write_text("b\n")
    subprocess.run(["fw_setenv", "-c", str(cfg), "bootcount", "1"], check=True)  # u-boot counted the boot
    platform.commit()
    env = printenv(cfg)
    assert (env["boot_slot"], env["upgrade_available"], env["bootcount"]) == ("b", "0", "0")


def test_a_torn_or_foreign_environment_is_refused(tmp_path: Path) -> None:
    store = UBootEnvStore(tmp_path / "env.bin", size=SIZE)
    store.write({"boot_slot": "a"})
    raw = bytearray((tmp_path / "env.bin").read_bytes())
    assert len(raw) == SIZE
    raw[10] ^= 0x01
    (tmp_path / "env.bin").write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="CRC mismatch"):
        store.read()
    (tmp_path / "short.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(IntegrityError, match="shorter than"):
        UBootEnvStore(tmp_path / "short.bin", size=SIZE).read()
    with pytest.raises(ConfigError, match="cannot be written"):
        store.write({"bad=key": "x"})
    (tmp_path / "bad.config").write_text("/dev/mtd0 zero 0x4000\n")
    with pytest.raises(ConfigError, match="must be numbers"):
        UBootEnvStore.from_fw_env_config(tmp_path / "bad.config")


def test_an_environment_at_an_offset_of_a_larger_device_is_written_in_place(tmp_path: Path) -> None:
    dev = tmp_path / "mmcblk0"
    dev.write_bytes(b"\xaa" * (3 * SIZE))
    store = UBootEnvStore(dev, offset=SIZE, size=SIZE)
    store.write({"boot_slot": "b"})
    data = dev.read_bytes()
    assert data[:SIZE] == b"\xaa" * SIZE and data[2 * SIZE :] == b"\xaa" * SIZE
    assert store.read() == {"boot_slot": "b"}
