"""vdgui-img create-rawvmdk (issue #19 part 1), run as a user runs it."""
from __future__ import annotations

import json
import os

from tests.conftest import run_cli
from tests.formats.test_vmdk_rawdisk import mbr_disk
from vdgui.vd import RAW_TEST_ENV


def test_create_rawvmdk_exposes_the_named_partitions(tmp_path):
    drive = mbr_disk(tmp_path)
    out = tmp_path / "w.vmdk"
    boot = tmp_path / "boot.bin"
    boot.write_bytes(b"\xfa" * 512)
    env = dict(os.environ, **{RAW_TEST_ENV: "1"})
    run_cli("create-rawvmdk", "--raw-drive", drive, "--partitions", "1,6", "--boot-sector",
            boot, out, env=env)
    text = out.read_text()
    assert 'createType="partitionedDevice"' in text and f'"{drive}" 12288' in text
    side = (tmp_path / "w-pt.vmdk").read_bytes()
    assert side[:440] == b"\xfa" * 440 and side[440:512] == drive.read_bytes()[440:512]
    r = run_cli("--allow-unsafe-paths", "partitions", out, env=env)
    assert "Scheme: mbr" in r.stdout
    info = json.loads(run_cli("info", "--json", out).stdout)      # no drive opened for info
    assert info["variant"] == "fixed,rawdisk"
    assert info["files"] == [str(out), str(tmp_path / "w-pt.vmdk")]
    r = run_cli("create", "-f", "VMDK", "--variant", "rawdisk", "--size", "1M",
                tmp_path / "v.vmdk", check=False)
    assert r.returncode == 1 and "vdgui-img create-rawvmdk --raw-drive DEV" in r.stderr
    # the drive decides; a bad number names the partitions there are
    r = run_cli("create-rawvmdk", "--raw-drive", drive, "--partitions", "2", tmp_path / "x.vmdk",
                env=env, check=False)
    assert r.returncode == 1 and "no partition 2 (its partitions: 1, 3, 5, 6)" in r.stderr
    # without the tests' flag a regular file is refused, in one line
    env.pop(RAW_TEST_ENV)
    r = run_cli("create-rawvmdk", "--raw-drive", drive, tmp_path / "y.vmdk", env=env,
                check=False)
    assert r.returncode == 1 and "is a regular file, not a host drive" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "y.vmdk").exists()
