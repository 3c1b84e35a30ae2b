"""What each dialog gives back when accepted: one dataclass per dialog, typed fields. The
operations controller turns them into jobs; a failed job hands the same object back to
``set_params`` ("Change and Retry…")."""
from __future__ import annotations

from dataclasses import dataclass, field

from vdgui.vd import ImageFlags


@dataclass(frozen=True)
class CreateParams:
    """Create: a new base image."""
    location: str
    size: int
    format: str
    flags: ImageFlags = ImageFlags.NONE
    config: dict = field(default_factory=dict)     # the format's options (ConfigForm values)
    comment: str | None = None
    encrypt: str | None = None                     # an encryption (issue #17), as CopyParams
    passphrase: object = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class SnapshotParams:
    """Create Differencing Image: a child of ``parent``."""
    parent: str
    location: str
    format: str | None
    comment: str | None = None


@dataclass(frozen=True)
class CopyParams:
    """Copy / convert ``src`` (its chain with ``as_chain``) to ``dst``."""
    src: str
    dst: str
    dst_format: str
    src_format: str | None = None
    variant: ImageFlags = ImageFlags.NONE
    keep_uuid: bool = False
    as_chain: bool = False
    new_size: int | None = None                    # None: the source's size
    dst_config: dict | None = None                 # the new image's format options
    encrypt: str | None = None                     # an encryption of the target (issue #17)
    # the target's new passphrase (a vd.Passphrase, wiped when the job ends; not kept for a
    # retry: typed again)
    passphrase: object = field(default=None, repr=False, compare=False)

    def copy_kwargs(self) -> dict:
        """The keyword arguments of copy_image (the optional ones only when set)."""
        kw = {"src_format": self.src_format, "variant": self.variant,
              "keep_uuid": self.keep_uuid, "as_chain": self.as_chain}
        if self.new_size:
            kw["new_size"] = self.new_size
        if self.dst_config:
            kw["dst_config"] = self.dst_config
        return kw


@dataclass(frozen=True)
class MoveParams:
    """Move: where to."""
    dst: str


@dataclass(frozen=True)
class MergeParams:
    """Merge ``source`` into ``target`` (one chain); ``deleted``: the files that go away,
    ``paths``: the whole chain shown."""
    source: str
    target: str
    deleted: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ResizeParams:
    """Resize: the new virtual size in bytes."""
    size: int


@dataclass(frozen=True)
class NetworkDiskParams:
    """Add Network Disk: a ``scheme://`` location opened with ``properties``."""
    format: str
    location: str
    properties: dict = field(default_factory=dict)
    remember_secrets: bool = False
    info: dict | None = None                       # what the connection test found


@dataclass(frozen=True)
class SecretsParams:
    """Secrets for a network image whose secrets were not remembered."""
    path: str
    secrets: dict = field(default_factory=dict)
    remember: bool = False


@dataclass(frozen=True)
class RepairParams:
    """Repair after its findings were shown: keep a backup of the image first?"""
    backup: bool = False


@dataclass(frozen=True)
class SparsifyParams:
    """Compact / Sparsify: "sparsify" (free space of the file systems) or "compact" (zero
    blocks only); ``dynamic``: a fixed image is replaced by its dynamic variant."""
    mode: str = "sparsify"
    dynamic: bool = False


@dataclass(frozen=True)
class FloppyParams:
    """Create Floppy Image: a formatted FAT12 floppy holding ``sources`` at its root."""
    location: str
    size: str                        # a FLOPPY_FORMATS name
    label: str = ""
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class IsoParams:
    """Create Optical Disc Image: an ISO9660 + Joliet + Rock Ridge disc of ``sources``."""
    location: str
    label: str = ""
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class RawDiskParams:
    """New Raw Disk VMDK: a VMDK over the host drive ``drive``, the whole drive (``partitions``
    None) or only the partitions named; ``relative``: through the partition devices."""
    location: str
    drive: str
    partitions: tuple[int, ...] | None = None
    relative: bool = False


@dataclass(frozen=True)
class PassphraseParams:
    """The prompt for an encrypted image's passphrase: ``passphrase`` (a vd.Passphrase) and
    whether to remember it in the desktop keyring."""
    path: str
    passphrase: object = field(default=None, repr=False, compare=False)
    remember: bool = False


@dataclass(frozen=True)
class EncryptParams:
    """Encrypt… (``encrypt`` an encryption name) or Decrypt… (``encrypt`` None): replace the
    image (``into`` None) or write a new file ``into`` of ``into_format``."""
    path: str
    encrypt: str | None = None
    into: str | None = None
    into_format: str | None = None
    passphrase: object = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class ChangePassphraseParams:
    """Change passphrase…: the new passphrase (the current one is asked when the job opens the
    image)."""
    path: str
    passphrase: object = field(default=None, repr=False, compare=False)
