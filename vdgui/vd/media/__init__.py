"""New removable media images made from the host's files: formatted FAT12 floppies (floppy.py,
structures in fat_layout.py) and ISO9660 discs with Joliet and Rock Ridge (iso.py, through
pycdlib); raw host-disk VMDKs (rawvmdk.py); sources.py collects and checks the files the
floppies and discs are filled from."""
from .floppy import DEFAULT_FLOPPY, FLOPPY_FORMATS, FloppyFormat, create_floppy, floppy_format
from .iso import create_iso, iso_label
from .rawvmdk import create_raw_vmdk
from .sources import folder_contents

__all__ = ["DEFAULT_FLOPPY", "FLOPPY_FORMATS", "FloppyFormat", "create_floppy",
           "create_iso", "create_raw_vmdk", "floppy_format", "folder_contents", "iso_label"]
