"""Parallels bundles (``name.hdd/``): DiskDescriptor.xml, its storage extents and snapshot
chain, read and written through the images of the chain (:class:`.image.ParallelsImage`)."""
from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Iterator

from ...backend import Backend, ImageFlags, OpenFlags
from ...errors import CorruptImage, ImageNotFound, NotSupported
from ...fileio import ImageFile, close_all, resolve_stored_name
from ...geometry import Geometry
from ...image import Alloc, CheckReport, FillFn, Image
from ...progress import ProgressCallback
from ...runs import merge_runs
from .image import ParallelsImage
from .layout import MAX_DESCRIPTOR, MAX_EXTENTS, MAX_SNAPSHOTS, SECTOR, ZERO_GUID


def _xml_escape(text: str) -> str:
    """Text for an XML element (xml.sax.saxutils would import urllib and ssl at start-up)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class _RawLayer:
    """A "Plain" extent image: a flat file."""

    def __init__(self, path: str, f: ImageFile, size: int, read_only: bool) -> None:
        self.location, self.f, self.size, self.read_only = path, f, size, read_only

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        return [(offset, length, Alloc.DATA)]

    def read(self, offset: int, length: int) -> bytes:
        data = self.f.pread(offset, length)
        return data + bytes(length - len(data))

    def write(self, offset: int, data: bytes | memoryview, fill: FillFn,
              fill_below: bool = False) -> None:
        self.f.pwrite(offset, data)

    def flush(self) -> None:
        if not self.read_only:
            self.f.sync()

    def close(self) -> None:
        if self.f.fd >= 0:
            try:
                self.flush()
            finally:
                self.f.close()

    def files(self) -> list[str]:
        return [self.location]


_Layer = ParallelsImage | _RawLayer     # an image of an extent's snapshot chain


class _Extent:
    def __init__(self, start: int, end: int, layers: list[_Layer]) -> None:
        self.start, self.end, self.layers = start, end, layers   # layers: base first


class ParallelsBundleImage(Image):
    """A Parallels bundle (``name.hdd/`` with DiskDescriptor.xml): extents x snapshot layers."""

    def __init__(self, backend: Backend, location: str, descriptor: str,
                 flags: OpenFlags) -> None:
        super().__init__(backend, location, flags.read_only)
        self.descriptor = descriptor
        self.extents: list[_Extent] = []
        try:
            self._load(flags)
        except BaseException:
            self.close()
            raise

    def _corrupt(self, message: str, *, field: str | None = None, expected: object = None,
                 found: object = None) -> CorruptImage:
        return CorruptImage(message, path=self.descriptor, field=field, expected=expected,
                            found=found)

    def _load(self, flags: OpenFlags) -> None:
        try:
            st = os.stat(self.descriptor)
        except OSError:
            raise ImageNotFound(f"{self.descriptor}: bundle descriptor not found") from None
        if st.st_size > MAX_DESCRIPTOR:
            raise self._corrupt("descriptor too large", field="file size",
                                expected=f"<= {MAX_DESCRIPTOR} bytes", found=st.st_size)
        with ImageFile(self.descriptor) as fh:      # a FIFO is refused, never waited on
            text = fh.pread(0, MAX_DESCRIPTOR + 1)
        if b"<!DOCTYPE" in text or b"<!ENTITY" in text:
            raise self._corrupt("descriptor carries a DTD/entity declarations; refused",
                                field="DOCTYPE")
        import xml.etree.ElementTree as ET  # with the first Parallels image, not at start-up
        try:
            root = ET.fromstring(text)
        except (ET.ParseError, LookupError, ValueError) as exc:   # incl. unknown encodings
            raise self._corrupt(f"descriptor is not well-formed XML ({exc})") from None
        if root.tag != "Parallels_disk_image":
            raise self._corrupt("not a Parallels disk descriptor", field="root element",
                                expected="Parallels_disk_image", found=root.tag)

        def num(elem: ET.Element, tag: str, where: str) -> int:
            t = elem.findtext(tag)
            try:
                v = int((t or "").strip())
            except ValueError:
                raise self._corrupt(f"{where}: {tag} is not a number", field=tag,
                                    found=repr(t)) from None
            if v < 0:
                raise self._corrupt(f"{where}: {tag} is negative", field=tag, found=v)
            return v

        params = root.find("Disk_Parameters")
        if params is None:
            raise self._corrupt("descriptor has no Disk_Parameters", field="Disk_Parameters")
        total = num(params, "Disk_size", "Disk_Parameters")
        self.size = total * SECTOR
        lss = params.findtext("LogicSectorSize")
        if lss and lss.strip() not in ("512",):
            raise NotSupported(f"{self.descriptor}: logical sector size {lss.strip()} is not "
                               "supported (512 only)")
        uid = (params.findtext("UID") or "").strip()
        try:
            self.uuid = uuidlib.UUID(uid.strip("{}")) if uid else None
        except ValueError:
            self.uuid = None
        heads = params.findtext("Heads")
        cyl = params.findtext("Cylinders")
        secs = params.findtext("Sectors")
        try:
            self.pchs = (Geometry(int(cyl), int(heads), int(secs))
                         if heads and cyl and secs else None)
        except ValueError:
            self.pchs = None
        # snapshots: the chain from the base to the current (top) snapshot
        shots: dict[str, str] = {}   # GUID: parent GUID
        snaps = root.find("Snapshots")
        top_guid = None
        if snaps is not None:
            top_guid = (snaps.findtext("TopGUID") or "").strip().lower() or None
            for shot in snaps.findall("Shot"):
                if len(shots) >= MAX_SNAPSHOTS:
                    raise self._corrupt("too many snapshots", field="Snapshots",
                                        expected=f"<= {MAX_SNAPSHOTS}",
                                        found=len(snaps.findall("Shot")))
                g = (shot.findtext("GUID") or "").strip().lower()
                p = (shot.findtext("ParentGUID") or ZERO_GUID).strip().lower()
                if not g:
                    raise self._corrupt("snapshot without a GUID", field="Shot")
                shots[g] = p
        chain = self._snapshot_chain(shots, top_guid)
        self.snapshot_chain = chain
        self.snapshot_count = len(shots)
        storages = root.find("StorageData")
        if storages is None or not storages.findall("Storage"):
            raise self._corrupt("descriptor lists no storage extents", field="StorageData")
        items = storages.findall("Storage")
        if len(items) > MAX_EXTENTS:
            raise self._corrupt("too many storage extents", field="StorageData",
                                expected=f"<= {MAX_EXTENTS}", found=len(items))
        pos = 0
        unsafe = bool(flags & OpenFlags.ALLOW_UNSAFE_PATHS)
        for i, s in enumerate(items):
            where = f"Storage {i}"
            start, end = num(s, "Start", where), num(s, "End", where)
            if start != pos or end <= start:
                raise self._corrupt(f"{where}: extents must be contiguous and non-empty",
                                    field="Start/End", expected=f"Start {pos} < End",
                                    found=f"{start}..{end}")
            images: dict[str, tuple[str, str]] = {}    # GUID: (type, file)
            for im in s.findall("Image"):
                g = (im.findtext("GUID") or "").strip().lower()
                images[g] = ((im.findtext("Type") or "Compressed").strip(),
                             (im.findtext("File") or "").strip())
            if not images:
                raise self._corrupt(f"{where}: no image listed", field="Image")
            if chain:
                missing = [g for g in chain if g not in images]
                if missing:
                    raise self._corrupt(f"{where}: no image for snapshot {missing[0]}",
                                        field="Image GUID")
                order = chain
            else:
                order = list(images)[:1]
            layers: list[_Layer] = []
            self.extents.append(_Extent(start * SECTOR, end * SECTOR, layers))
            for n, g in enumerate(order):
                kind, name = images[g]
                top = n == len(order) - 1
                layers.append(self._open_layer(kind, name, (end - start) * SECTOR,
                                               read_only=flags.read_only or not top,
                                               unsafe=unsafe, where=where))
            pos = end
        if pos != total:
            raise self._corrupt("extents do not cover the disk", field="End",
                                expected=f"last End = Disk_size {total}", found=pos)
        first = self.extents[0].layers[0]
        self.block_size = first.block_size if isinstance(first, ParallelsImage) else SECTOR
        self.flags = ImageFlags.NONE

    def _snapshot_chain(self, shots: dict[str, str], top: str | None) -> list[str]:
        if not shots:
            return []
        if top is None:
            parents = set(shots.values())
            leaves = [g for g in shots if g not in parents]
            if len(leaves) != 1:
                raise NotSupported(f"{self.descriptor}: cannot tell the current snapshot "
                                   f"({len(leaves)} leaves and no TopGUID)")
            top = leaves[0]
        if top not in shots:
            raise self._corrupt("TopGUID names no snapshot", field="TopGUID", found=top)
        chain = [top]
        while shots[chain[-1]] != ZERO_GUID:
            p = shots[chain[-1]]
            if p not in shots or p in chain:
                raise self._corrupt("snapshot parent chain is broken or loops",
                                    field="ParentGUID", found=p)
            chain.append(p)
        return list(reversed(chain))

    def _open_layer(self, kind: str, name: str, size: int, *, read_only: bool, unsafe: bool,
                    where: str) -> _Layer:
        path = resolve_stored_name(self.descriptor, name, allow_unsafe=unsafe,
                                   what=f"{where} image file")
        if os.path.abspath(path) == os.path.abspath(self.descriptor):
            raise self._corrupt(f"{where}: image file is the descriptor itself", field="File")
        fl = OpenFlags.READ_ONLY if read_only else OpenFlags.NORMAL
        if kind == "Compressed":
            f = ImageFile(path, writable=not read_only)
            img = ParallelsImage(self.backend, path, f, fl)
            if img.size < size:
                img.close()
                raise self._corrupt(f"{where}: image {name} is smaller than its extent",
                                    field="End", expected=f">= {size} bytes", found=img.size)
            return img
        if kind == "Plain":
            f = ImageFile(path, writable=not read_only)
            return _RawLayer(path, f, size, read_only)
        raise NotSupported(f"{self.descriptor}: {where}: image type {kind!r} is not supported")

    # -- data --------------------------------------------------------------------------------
    def _pieces(self, offset: int, length: int) -> Iterator[tuple[_Extent, int, int]]:
        end = offset + length
        for e in self.extents:
            if e.end <= offset or e.start >= end:
                continue
            s, t = max(offset, e.start), min(end, e.end)
            yield e, s, t - s

    def _layer_status(self, layers: list[_Layer], k: int, off: int, n: int,
                      out: list[tuple[int, int, Alloc]], base: int) -> None:
        if k < 0:
            out.append((base + off, n, Alloc.UNALLOCATED))
            return
        for s, ln, st in layers[k].block_status(off, n):
            if st == Alloc.UNALLOCATED:
                self._layer_status(layers, k - 1, s, ln, out, base)
            else:
                out.append((base + s, ln, st))

    def _layer_read(self, layers: list[_Layer], k: int, off: int, n: int, buf: bytearray,
                    bufoff: int) -> None:
        if k < 0:
            return
        for s, ln, st in layers[k].block_status(off, n):
            p = bufoff + s - off
            if st == Alloc.DATA:
                buf[p:p + ln] = layers[k].read(s, ln)
            elif st == Alloc.UNALLOCATED:
                self._layer_read(layers, k - 1, s, ln, buf, p)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        out: list[tuple[int, int, Alloc]] = []
        for e, s, n in self._pieces(offset, length):
            self._layer_status(e.layers, len(e.layers) - 1, s - e.start, n, out, e.start)
        return merge_runs(out)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        for e, s, n in self._pieces(offset, length):
            self._layer_read(e.layers, len(e.layers) - 1, s - e.start, n, buf, s - offset)
        return bytes(buf)

    def write(self, offset: int, data: bytes, fill: FillFn) -> None:
        self.require_writable()
        mv = memoryview(data)
        for e, s, n in self._pieces(offset, len(data)):
            top = e.layers[-1]
            below = len(e.layers) > 1
            layers = e.layers

            def fill_from_below(o: int, ln: int, layers: list[_Layer] = layers) -> bytes:
                b = bytearray(ln)
                self._layer_read(layers, len(layers) - 2, o, ln, b, 0)
                return bytes(b)

            top.write(s - e.start, mv[s - offset:s - offset + n], fill_from_below,
                      fill_below=below)

    def flush(self) -> None:
        for e in self.extents:
            e.layers[-1].flush()

    def close(self) -> None:
        layers = [layer for e in self.extents for layer in e.layers]
        self.extents = []
        close_all(layer.close for layer in layers)

    def files(self) -> list[str]:
        out = [self.descriptor]
        for e in self.extents:
            out += [layer.location for layer in e.layers]
        return out

    def info(self) -> dict[str, object]:
        return {
            "subformat": "bundle",
            "descriptor": self.descriptor,
            "extents": [{"start": e.start, "end": e.end,
                         "files": [os.path.basename(layer.location) for layer in e.layers]}
                        for e in self.extents],
            "snapshots": self.snapshot_count,
            "state": ("current state (top snapshot " + self.snapshot_chain[-1] + ")"
                      if self.snapshot_chain else "base image (no snapshots listed)"),
            "snapshot_chain": list(self.snapshot_chain),
        }

    def compact(self, progress: ProgressCallback | None = None,
                parent_read: FillFn | None = None) -> None:
        """Compact each extent's top image (clusters equal to the snapshot below are dropped)."""
        self.require_writable()
        total = len(self.extents)
        for i, e in enumerate(self.extents):
            top = e.layers[-1]
            if isinstance(top, ParallelsImage):
                below: FillFn | None = None
                if len(e.layers) > 1:
                    def from_below(o: int, ln: int, layers: list[_Layer] = e.layers) -> bytes:
                        b = bytearray(ln)
                        self._layer_read(layers, len(layers) - 2, o, ln, b, 0)
                        return bytes(b)
                    below = from_below
                top.compact(None, below)
            if progress and progress(i + 1, total) is False:
                from ...errors import Cancelled
                raise Cancelled()

    def resize(self, new_size: int, progress: ProgressCallback | None = None) -> None:
        raise NotSupported(f"{self.location}: resizing a Parallels bundle is not supported "
                           "(resize its .hds extent images or convert the disk)")

    def check(self, repair: bool = False, dry_run: bool = False,
              progress: ProgressCallback | None = None) -> CheckReport:
        rep = CheckReport()
        for e in self.extents:
            for layer in e.layers:
                if isinstance(layer, ParallelsImage):
                    r = layer.check(repair=repair and not layer.read_only, dry_run=dry_run)
                    for p in r.problems:
                        p.what = f"{os.path.basename(layer.location)}: {p.what}"
                        rep.problems.append(p)
                    rep.orphans.extend(r.orphans)
        rep.repaired = any(p.repaired for p in rep.problems)
        if progress:
            progress(1, 1)
        return rep


# -- the backend --------------------------------------------------------------------------------

_DESCRIPTOR = """<?xml version='1.0' encoding='UTF-8'?>
<Parallels_disk_image Version="1.0">
    <Disk_Parameters>
        <Disk_size>{sectors}</Disk_size>
        <Cylinders>{cylinders}</Cylinders>
        <PhysicalSectorSize>4096</PhysicalSectorSize>
        <LogicSectorSize>512</LogicSectorSize>
        <Heads>16</Heads>
        <Sectors>32</Sectors>
        <Padding>0</Padding>
        <Encryption>
            <Engine>{{00000000-0000-0000-0000-000000000000}}</Engine>
            <Data></Data>
            <Salt></Salt>
        </Encryption>
        <UID>{uid}</UID>
        <Name>{name}</Name>
        <Miscellaneous>
            <CompatLevel>level2</CompatLevel>
            <Bootable>1</Bootable>
            <SuspendState>0</SuspendState>
        </Miscellaneous>
    </Disk_Parameters>
    <StorageData>
        <Storage>
            <Start>0</Start>
            <End>{sectors}</End>
            <Blocksize>{blocksize}</Blocksize>
            <Image>
                <GUID>{guid}</GUID>
                <Type>Compressed</Type>
                <File>{file}</File>
            </Image>
        </Storage>
    </StorageData>
    <Snapshots>
        <TopGUID>{guid}</TopGUID>
        <Shot>
            <GUID>{guid}</GUID>
            <ParentGUID>{{00000000-0000-0000-0000-000000000000}}</ParentGUID>
        </Shot>
    </Snapshots>
</Parallels_disk_image>
"""
