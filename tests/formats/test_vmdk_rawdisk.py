"""Raw host-disk VMDKs (issue #19 part 1): whole drives and chosen partitions, the tables
copied into NAME-pt.vmdk, ZERO elsewhere. Regular files stand in for disks behind the tests'
flag (VDGUI_TEST_RAW_FILES); sfdisk/sgdisk make their tables; qemu-img reads the result."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess

import pytest

from vdgui import vd
from vdgui.vd import Disk, OpenFlags
from vdgui.vd import rawdisk as rawdisk_mod
from vdgui.vd.inside.partitions import read_layout

MiB = 1 << 20
S = 512


def _tool(name):
    if shutil.which(name) is None:
        pytest.fail(f"{name} is not installed (Debian: fdisk / gdisk)", pytrace=False)


def _fill(path, size):
    """Each 64 KiB block filled with its own non-zero byte, so any misplaced range shows."""
    with open(path, "wb") as f:
        for i in range(size // 65536):
            f.write(bytes([i % 251 + 1]) * 65536)


def mbr_disk(tmp_path):
    """16 MiB MBR disk: primary 1, extended 2 holding logical 5 and 6, primary 3."""
    _tool("sfdisk")
    p = tmp_path / "host" / "disk.img"
    p.parent.mkdir()
    _fill(p, 16 * MiB)
    script = ("label: dos\nstart=2048,size=4096,type=83\nstart=6144,size=16384,type=5\n"
              "start=8192,size=2048,type=83\nstart=12288,size=4096,type=7\n"
              "start=22528,size=8192,type=c\n")
    subprocess.run(["sfdisk", "-q", str(p)], input=script, text=True, check=True,
                   capture_output=True)
    return p


def gpt_disk(tmp_path):
    """16 MiB GPT disk: partitions 1..3 (sgdisk)."""
    _tool("sgdisk")
    p = tmp_path / "host" / "disk.img"
    p.parent.mkdir()
    _fill(p, 16 * MiB)
    subprocess.run(["sgdisk", "-n", "1:2048:+2M", "-t", "1:ef00", "-n", "2:0:+4M",
                    "-n", "3:0:+3M", str(p)], check=True, capture_output=True)
    return p


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    monkeypatch.setenv(vd.RAW_TEST_ENV, "1")
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw 0 0\n")
    monkeypatch.setattr(rawdisk_mod, "MOUNTS", str(mounts))
    return mounts


def _read(vmdk):
    with Disk() as d:
        d.open(str(vmdk), flags=OpenFlags.READ_ONLY | OpenFlags.ALLOW_UNSAFE_PATHS)
        return d.read(0, d.size)


def _qemu_view(vmdk, tmp_path):
    """qemu-img cannot open VirtualBox's raw createTypes (fullDevice, partitionedDevice: it says
    'Unsupported image type') and skips ZERO extent lines. This copy of the descriptor is one it
    reads: monolithicFlat, each ZERO extent a FLAT extent of an all-zero sparse file; every FLAT
    extent (drive, partition device, NAME-pt.vmdk) kept as written."""
    with open(vmdk) as f:
        text = f.read()
    zero = tmp_path / "zeroes.bin"
    total = sum(int(m) for m in re.findall(r"^RW (\d+) ZERO", text, re.M))
    with open(zero, "wb") as f:
        f.truncate(max(total, 1) * S)
    pos = [0]

    def repl(m):
        n = int(m.group(1))
        line = f'RW {n} FLAT "{zero}" {pos[0]}'
        pos[0] += n
        return line

    text = re.sub(r"^RW (\d+) ZERO\s*$", repl, text, flags=re.M)
    text = text.replace('createType="partitionedDevice"', 'createType="monolithicFlat"')
    text = text.replace('createType="fullDevice"', 'createType="monolithicFlat"')
    out = os.path.join(os.path.dirname(vmdk), "qemu-view.vmdk")
    with open(out, "w") as f:
        f.write(text)
    return out


def _expected(drive: bytes, layout, exposed, tables):
    """The drive with every byte outside ``exposed`` partitions and ``tables`` ranges zero."""
    want = bytearray(len(drive))
    for n in exposed:
        p = layout.partition(n)
        want[p.start:p.end] = drive[p.start:p.end]
    for a, b in tables:
        want[a:b] = drive[a:b]
    return bytes(want)


def test_mbr_with_logical_partitions_exposes_only_the_chosen_ones(tmp_path, stand_ins, qemu):
    drive = mbr_disk(tmp_path)
    out = tmp_path / "vm" / "win.vmdk"
    out.parent.mkdir()
    vd.create_raw_vmdk(str(out), str(drive), [1, 6])
    text = out.read_text()
    assert 'createType="partitionedDevice"' in text
    side = out.parent / "win-pt.vmdk"
    # MBR + gap to partition 1; each EBR + its gap; as VirtualBox lays them out
    assert re.findall(r"^RW \d+ \w+.*$", text, re.M) == [
        'RW 2048 FLAT "win-pt.vmdk" 0',
        f'RW 4096 FLAT "{drive}" 2048',
        'RW 2048 FLAT "win-pt.vmdk" 2048',       # EBR of 5 at 6144, up to 5 at 8192
        "RW 2048 ZERO",                          # logical 5, hidden
        'RW 2048 FLAT "win-pt.vmdk" 4096',       # EBR of 6 at 10240
        f'RW 4096 FLAT "{drive}" 12288',         # logical 6
        "RW 16384 ZERO",                         # rest of the extended one, 3 (hidden), tail
    ]
    data = drive.read_bytes()
    with Disk() as d:
        img = d.open(str(out), flags=OpenFlags.READ_ONLY | OpenFlags.ALLOW_UNSAFE_PATHS)
        assert img.files() == [str(out), str(side)]        # never the drive
        layout = vd.disk_layout(d)
        got = d.read(0, d.size)
    host = read_layout(lambda o, n: data[o:o + n], len(data))
    assert [(p.number, p.start, p.size) for p in layout.partitions] == \
        [(p.number, p.start, p.size) for p in host.partitions]
    tables = [(0, MiB), (6144 * S, 8192 * S), (10240 * S, 12288 * S)]
    assert got == _expected(data, host, [1, 6], tables)
    assert side.read_bytes() == b"".join(data[a:b] for a, b in tables)
    # an INFO open (the library's) opens no extent, so the drive's absolute name is no danger;
    # reading still needs unsafe paths allowed
    with Disk() as d:
        img = d.open(str(out), flags=OpenFlags.INFO | OpenFlags.READ_ONLY)
        assert img.files() == [str(out), str(side)] and d.size == 16 * MiB
    with pytest.raises(vd.UnsafePath), Disk() as d:
        d.open(str(out), flags=OpenFlags.READ_ONLY)
    view = _qemu_view(str(out), tmp_path)
    assert "virtual size: 16 MiB" in qemu.img("info", view).stdout
    assert qemu.to_raw(view, tmp_path / "q.raw").read_bytes() == got


def test_gpt_keeps_both_tables_and_hides_the_other_partitions(tmp_path, stand_ins, qemu):
    drive = gpt_disk(tmp_path)
    out = tmp_path / "vm" / "g.vmdk"
    out.parent.mkdir()
    vd.create_raw_vmdk(str(out), str(drive), [2])
    data = drive.read_bytes()
    host = read_layout(lambda o, n: data[o:o + n], len(data))
    assert host.scheme == "gpt" and not host.problems
    end = len(data)
    # protective MBR + header + entries up to partition 1; backup entries + header at the end
    tables = [(0, MiB), (end - 33 * S, end)]
    got = _read(out)
    assert got == _expected(data, host, [2], tables)
    with Disk() as d:
        d.open(str(out), flags=OpenFlags.READ_ONLY | OpenFlags.ALLOW_UNSAFE_PATHS)
        seen = vd.disk_layout(d)
    assert not seen.problems and seen.disk_guid == host.disk_guid
    view = _qemu_view(str(out), tmp_path)
    assert qemu.to_raw(view, tmp_path / "q.raw").read_bytes() == got


def test_relative_extents_name_the_partition_devices(tmp_path, stand_ins, qemu):
    drive = mbr_disk(tmp_path)
    data = drive.read_bytes()
    host = read_layout(lambda o, n: data[o:o + n], len(data))
    for n in (3, 5):                     # the stand-ins for /dev/sdX3, /dev/sdX5
        p = host.partition(n)
        (drive.parent / f"disk.img{n}").write_bytes(data[p.start:p.end])
    out = tmp_path / "vm" / "rel.vmdk"
    out.parent.mkdir()
    vd.create_raw_vmdk(str(out), str(drive), [3, 5], relative=True)
    text = out.read_text()
    assert f'RW 2048 FLAT "{drive}5" 0' in text and f'RW 8192 FLAT "{drive}3" 0' in text
    tables = [(0, MiB), (6144 * S, 8192 * S), (10240 * S, 12288 * S)]
    got = _read(out)
    assert got == _expected(data, host, [3, 5], tables)
    view = _qemu_view(str(out), tmp_path)
    assert qemu.to_raw(view, tmp_path / "q.raw").read_bytes() == got


def test_writes_reach_the_drive_and_the_boot_sector_replaces_only_the_boot_code(
        tmp_path, stand_ins):
    drive = mbr_disk(tmp_path)
    before = drive.read_bytes()
    out = tmp_path / "vm" / "b.vmdk"
    out.parent.mkdir()
    vd.create_raw_vmdk(str(out), str(drive), [1], boot_sector=b"\xeb\x3c" + b"\x90" * 510)
    got = _read(out)
    assert got[:440] == b"\xeb\x3c" + b"\x90" * 438
    assert got[440:512] == before[440:512]          # disk signature, table, 55 AA: the host's
    assert drive.read_bytes() == before             # creating never writes the drive
    with Disk() as d:
        d.open(str(out), flags=OpenFlags.ALLOW_UNSAFE_PATHS)
        d.write(2048 * S, b"\x77" * S)
    assert drive.read_bytes()[2048 * S:2049 * S] == b"\x77" * S


def test_whole_drive_is_a_full_device(tmp_path, stand_ins):
    drive = gpt_disk(tmp_path)
    out = tmp_path / "vm" / "all.vmdk"
    out.parent.mkdir()
    vd.create_raw_vmdk(str(out), str(drive))
    assert 'createType="fullDevice"' in out.read_text()
    assert f'RW 32768 FLAT "{drive}" 0' in out.read_text()
    assert not (out.parent / "all-pt.vmdk").exists()
    assert _read(out) == drive.read_bytes()


def test_refusals_leave_nothing_behind(tmp_path, stand_ins, monkeypatch):
    drive = mbr_disk(tmp_path)
    vm = tmp_path / "vm"
    vm.mkdir()
    out = str(vm / "x.vmdk")
    with pytest.raises(vd.InvalidArgument, match=r"no partition 4 \(its partitions: 1, 3, 5, 6\)"):
        vd.create_raw_vmdk(out, str(drive), [1, 4])
    with pytest.raises(vd.InvalidArgument, match="not a partition number"):
        vd.parse_partitions("1,x")
    # a chosen partition mounted on this host is refused; another one is not in the way
    stand_ins.write_text(f"{drive}5 /mnt/data ext4 rw 0 0\n")
    (drive.parent / "disk.img5").write_bytes(b"")
    with pytest.raises(vd.Refused, match=r"partition 5 .* mounted at /mnt/data"):
        vd.create_raw_vmdk(out, str(drive), [1, 5])
    with pytest.raises(vd.Refused, match="mounted at /mnt/data"):
        vd.create_raw_vmdk(out, str(drive))                # the whole drive includes it
    assert os.listdir(vm) == []
    vd.create_raw_vmdk(out, str(drive), [1, 6])
    assert sorted(os.listdir(vm)) == ["x-pt.vmdk", "x.vmdk"]
    # a regular file is a host drive only under the tests' flag
    monkeypatch.delenv(vd.RAW_TEST_ENV)
    with pytest.raises(vd.NotSupported, match="is a regular file, not a host drive"):
        vd.create_raw_vmdk(str(vm / "y.vmdk"), str(drive), [1])
    # the keys without RawDrive, and unsafe paths not allowed
    with pytest.raises(vd.InvalidArgument, match="need RawDrive"), Disk() as d:
        d.create_base(str(vm / "z.vmdk"), MiB, "VMDK", config={"Partitions": "1"})
    assert sorted(os.listdir(vm)) == ["x-pt.vmdk", "x.vmdk"]


def test_permission_message_names_the_group():
    """An unreadable block device: the message says which group would grant access."""
    if os.geteuid() != 0:
        pytest.fail("needs root (to make a device node)", pytrace=False)
    import grp
    import pwd
    import tempfile

    from vdgui.vd.fileio import ImageFile
    folder = tempfile.mkdtemp(prefix="vdgui-perm-")     # a folder 'nobody' may look into
    os.chmod(folder, 0o755)
    node = os.path.join(folder, "fakedisk")
    os.mknod(node, stat.S_IFBLK | 0o660, os.makedev(7, 200))
    os.chown(node, 0, grp.getgrnam("disk").gr_gid)
    os.chmod(node, 0o660)

    def as_nobody(path):
        # a forked child drops to nobody with the modules already loaded: the project (a fresh
        # clone in a 0700 temporary folder under CI) need not be readable by nobody
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(grp.getgrnam("nogroup").gr_gid)
                os.setuid(pwd.getpwnam("nobody").pw_uid)
                try:
                    ImageFile(path)
                    out = "opened"
                except Exception as e:
                    out = str(e)
                os.write(w, out.encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            out = f.read().decode()
        os.waitpid(pid, 0)
        return out

    try:
        msg = as_nobody(node)
        assert "Permission denied" in msg and "root:disk, mode 0660" in msg
        assert "add yourself to group 'disk'" in msg
        os.chmod(node, 0o600)
        assert "only root may read it" in as_nobody(node)
    finally:
        shutil.rmtree(folder)


def _fake_block_device(tmp_path, monkeypatch, sector=512):
    """A block device node (a number no driver holds) and a sysfs tree for it: partition 1
    held by dm-3, partition 5 free."""
    if os.geteuid() != 0:
        pytest.fail("needs root (to make a device node)", pytrace=False)
    node = tmp_path / "fake0"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(240, 7))
    dev = tmp_path / "sys" / "devices" / "fake0"
    (dev / "queue").mkdir(parents=True)
    (dev / "queue" / "logical_block_size").write_text(f"{sector}\n")
    (dev / "holders").mkdir()
    for n, start, holder in ((1, 2048, "dm-3"), (5, 8192, None)):
        part = dev / f"fake0p{n}"
        (part / "holders").mkdir(parents=True)
        (part / "partition").write_text(f"{n}\n")
        (part / "start").write_text(f"{start}\n")
        if holder:
            (part / "holders" / holder).write_text("")
    block = tmp_path / "sys" / "dev" / "block"
    block.mkdir(parents=True)
    (block / "240:7").symlink_to(dev)
    monkeypatch.setattr(rawdisk_mod, "SYS_BLOCK", str(block))
    return str(node)


def test_block_devices_are_read_through_sysfs(tmp_path, monkeypatch, stand_ins):
    node = _fake_block_device(tmp_path, monkeypatch)
    from vdgui.vd.inside.partitions import Layout, Partition
    layout = Layout("mbr", 16 * MiB, S, [Partition(1, MiB, MiB, "0x83", "Linux"),
                                         Partition(5, 4 * MiB, MiB, "0x83", "Linux")])
    assert rawdisk_mod.partition_device(node, 5) == "/dev/fake0p5"    # the kernel's name
    assert rawdisk_mod.in_use(node, layout) == {1: "in use by dm-3"}   # LUKS, LVM, RAID
    assert rawdisk_mod.partition_device(str(tmp_path / "disk.img"), 2) == \
        str(tmp_path / "disk.img2")
    assert rawdisk_mod.partition_device("/dev/nvme0n1", 2) == "/dev/nvme0n1p2"


def test_drives_with_4k_sectors_are_refused(tmp_path, monkeypatch):
    node = _fake_block_device(tmp_path, monkeypatch, sector=4096)
    with pytest.raises(vd.NotSupported, match="4096-byte sectors"):
        vd.inspect_drive(node)


@pytest.fixture
def loop_device(tmp_path):
    """A real block device: a read-only loop device over an MBR stand-in disk."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup for a loop device")
    drive = mbr_disk(tmp_path)
    r = subprocess.run(["losetup", "-f", "--show", "-r", str(drive)], capture_output=True,
                       text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"no loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev, drive
    finally:
        subprocess.run(["losetup", "-d", dev], timeout=30)


def test_a_real_block_device_without_the_tests_flag(tmp_path, loop_device, monkeypatch):
    """No stand-in: a loop device is a host drive. It is read-only, so creating proves the
    drive is only read."""
    monkeypatch.delenv(vd.RAW_TEST_ENV, raising=False)
    dev, drive = loop_device
    out = tmp_path / "vm" / "loop.vmdk"
    out.parent.mkdir()
    vd.create_raw_vmdk(str(out), dev, [1, 6])
    assert f'RW 4096 FLAT "{dev}" 12288' in out.read_text()
    data = drive.read_bytes()
    host = read_layout(lambda o, n: data[o:o + n], len(data))
    tables = [(0, MiB), (6144 * S, 8192 * S), (10240 * S, 12288 * S)]
    assert _read(out) == _expected(data, host, [1, 6], tables)


def test_relative_refuses_a_partition_the_kernel_places_elsewhere(tmp_path, monkeypatch):
    """The table on the disk says partition 1 starts at 2 MiB; the kernel (sysfs) still has
    it at 1 MiB (the table changed, not re-read): a Relative extent would map the wrong bytes."""
    node = _fake_block_device(tmp_path, monkeypatch)
    part = tmp_path / "fake0p1"
    os.mknod(part, stat.S_IFBLK | 0o600, os.makedev(240, 8))
    monkeypatch.setattr(rawdisk_mod, "partition_device", lambda drive, n: str(part))
    from vdgui.vd.inside.partitions import Layout, Partition
    layout = Layout("mbr", 16 * MiB, S, [Partition(1, 2 * MiB, MiB, "0x83", "Linux")],
                    tables=[(0, S)])
    drive = rawdisk_mod.RawDrive(node, 16 * MiB, True, layout)
    with pytest.raises(vd.Refused, match=r"kernel places partition 1 at byte 1048576, the "
                                         r"partition table at byte 2097152.*partprobe"):
        rawdisk_mod.plan(drive, [1], relative=True)
