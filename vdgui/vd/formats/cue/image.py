"""The CUE backend's cue sheet parser, image and open (its declaration and probe are the
package's)."""
from __future__ import annotations

import os
import re
from types import ModuleType

from ...backend import Backend, ImageFlags, OpenFlags
from ...errors import CorruptImage, ImageNotFound, NotSupported
from ...fileio import ImageFile, resolve_stored_name
from ...image import Alloc, Image, Region
from . import MAX_CUE, CueBackend

MAX_TRACKS = 99
MODES = {   # cue keyword -> (block size, data form)
    "MODE1/2048": (2048, "MODE1_2048"),
    "MODE1/2352": (2352, "MODE1_2352"),
    "MODE2/2336": (2336, "MODE2_2336"),
    "MODE2/2352": (2352, "MODE2_2352"),
    "AUDIO": (2352, "CDDA"),
}
_MSF = re.compile(r"^(\d{1,3}):(\d{2}):(\d{2})$")


def _msf_frames(text: str, where: str) -> int:
    m = _MSF.match(text)
    if not m or int(m.group(2)) > 59 or int(m.group(3)) > 74:
        raise CorruptImage(f"{where}: bad time {text!r}", expected="mm:ss:ff (ss < 60, ff < 75)",
                           found=text)
    return (int(m.group(1)) * 60 + int(m.group(2))) * 75 + int(m.group(3))



def _shlex() -> ModuleType:
    import shlex  # imported with the first cue sheet, not by every vdgui-img start
    return shlex

class CueSheet:
    """Parsed cue sheet: files, and tracks as (number, file index, mode, index01 frame)."""

    def __init__(self, text: str, path: str):
        self.files: list[str] = []
        self.tracks: list[dict] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            where = f"{path} line {lineno}"
            try:
                words = _shlex().split(line, posix=True)
            except ValueError:
                raise CorruptImage(f"{where}: unbalanced quotes in {line.strip()!r}") from None
            if not words:
                continue
            kw = words[0].upper()
            if kw == "FILE":
                if len(words) < 3:
                    raise CorruptImage(f"{where}: FILE needs a name and a type", found=line.strip())
                if words[-1].upper() not in ("BINARY", "MOTOROLA"):
                    raise NotSupported(f"{where}: file type {words[-1]} is not supported "
                                       "(BINARY and MOTOROLA are)")
                self.files.append(words[1])
            elif kw == "TRACK":
                if not self.files:
                    raise CorruptImage(f"{where}: TRACK before any FILE")
                if len(words) != 3 or not words[1].isdigit():
                    raise CorruptImage(
                        f"{where}: TRACK needs a number and a mode", found=line.strip()
                    )
                mode = words[2].upper()
                if mode not in MODES:
                    raise NotSupported(
                        f"{where}: track mode {words[2]} is not supported "
                        f"(supported: {', '.join(MODES)})"
                    )
                if len(self.tracks) >= MAX_TRACKS:
                    raise CorruptImage(f"{where}: more than {MAX_TRACKS} tracks")
                self.tracks.append(
                    {
                        "number": int(words[1]),
                        "file": len(self.files) - 1,
                        "mode": mode,
                        "index1": None,
                        "index0": None,
                    }
                )
            elif kw == "INDEX":
                if not self.tracks or len(words) != 3:
                    raise CorruptImage(
                        f"{where}: INDEX outside a track or malformed", found=line.strip()
                    )
                frames = _msf_frames(words[2], where)
                if words[1] in ("01", "1"):
                    self.tracks[-1]["index1"] = frames
                elif words[1] in ("00", "0"):
                    self.tracks[-1]["index0"] = frames
            elif kw in (
                "REM",
                "CATALOG",
                "CDTEXTFILE",
                "FLAGS",
                "ISRC",
                "PERFORMER",
                "SONGWRITER",
                "TITLE",
                "PREGAP",
                "POSTGAP",
            ):
                continue
            else:
                raise CorruptImage(f"{where}: unknown cue sheet command {words[0]!r}")
        if not self.files or not self.tracks:
            raise CorruptImage(f"{path}: cue sheet has no FILE or no TRACK")
        for t in self.tracks:
            if t["index1"] is None:
                raise CorruptImage(f"{path}: track {t['number']} has no INDEX 01")


class CueImage(Image):
    def __init__(self, backend: Backend, location: str, allow_unsafe: bool,
                 info_only: bool) -> None:
        super().__init__(backend, location, True)
        self.flags = ImageFlags.FIXED  # every sector stored in the BIN files: not "dynamic"
        with ImageFile(location) as f:
            size = f.size()
            if size > MAX_CUE:
                raise CorruptImage(
                    "cue sheet too large", path=location, expected=f"<= {MAX_CUE}", found=size
                )
            raw = f.pread(0, size)
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        self.sheet = CueSheet(text, location)
        self.bin_paths = [
            resolve_stored_name(location, n, allow_unsafe=allow_unsafe, what="BIN file")
            for n in self.sheet.files
        ]
        self.bins: list[ImageFile] = []
        self.bin_sizes: list[int] = []
        try:
            for p in self.bin_paths:
                if not os.path.isfile(p):
                    raise ImageNotFound(f"{location}: BIN file not found: {p}")
                bf = ImageFile(p)
                self.bins.append(bf)
                self.bin_sizes.append(bf.size())
        except BaseException:
            self.close()
            raise
        self.bin_starts = []
        pos = 0
        for s in self.bin_sizes:
            self.bin_starts.append(pos)
            pos += s
        self.size = pos
        self.block_size = 2048
        self._regions = self._make_regions()

    def _make_regions(self) -> list[Region]:
        regions = []
        by_file: dict[int, list[dict]] = {}
        for t in self.sheet.tracks:
            by_file.setdefault(t["file"], []).append(t)
        for fi, tracks in sorted(by_file.items()):
            # byte offset of each track's INDEX 01 inside its file (modes may differ per track)
            byte = 0
            prev_frames = 0
            prev_bs = MODES[tracks[0]["mode"]][0]
            starts = []
            for t in tracks:
                byte += (t["index1"] - prev_frames) * prev_bs
                if t["index1"] < prev_frames:
                    raise CorruptImage(
                        f"{self.location}: track {t['number']} starts before the previous track",
                        expected=f">= frame {prev_frames}",
                        found=t["index1"],
                    )
                starts.append(byte)
                prev_frames = t["index1"]
                prev_bs = MODES[t["mode"]][0]
            fsize = self.bin_sizes[fi]
            for i, t in enumerate(tracks):
                bs, form = MODES[t["mode"]]
                start = starts[i]
                end = starts[i + 1] if i + 1 < len(tracks) else fsize
                if i + 1 < len(tracks) and tracks[i + 1]["index0"] is not None:
                    gap = (tracks[i + 1]["index1"] - tracks[i + 1]["index0"]) * bs
                    end = max(start, end - gap)
                if start > fsize or end > fsize:
                    raise CorruptImage(
                        f"{self.location}: track {t['number']} lies past the end of "
                        f"{self.bin_paths[fi]}",
                        expected=f"<= {fsize}",
                        found=end,
                    )
                length = (end - start) // bs * bs
                regions.append(
                    Region(self.bin_starts[fi] + start, length, bs, form, "NONE", t["number"])
                )
        return regions

    def regions(self) -> list[Region]:
        return list(self._regions)

    def files(self) -> list[str]:
        return [self.location] + list(self.bin_paths)

    def info(self) -> dict:
        return {"tracks": len(self._regions), "bin_files": list(self.bin_paths)}

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, Alloc]]:
        return [(offset, length, Alloc.DATA)]

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        pos, end = offset, offset + length
        for start, size, f in zip(self.bin_starts, self.bin_sizes, self.bins):
            if pos >= end:
                break
            if pos >= start + size:
                continue
            n = min(end, start + size) - pos
            out += f.pread(pos - start, n)
            pos += n
        if len(out) < length:
            out += bytes(length - len(out))
        return bytes(out)

    def close(self) -> None:
        for f in self.bins:
            f.close()
        self.bins = []


def open_image(backend: CueBackend, location: str, flags: OpenFlags = OpenFlags.NORMAL,
         config: dict | None = None) -> CueImage:
    if not flags.read_only:
        raise NotSupported(f"{location}: CUE/BIN images are read-only; open them read-only")
    return CueImage(
        backend, location, bool(flags & OpenFlags.ALLOW_UNSAFE_PATHS), bool(flags & OpenFlags.INFO)
    )

