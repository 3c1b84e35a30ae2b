"""iSCSI backend: a LUN on an iSCSI target used as a disk (RFC 7143), configured by its keys.

VirtualBox's iSCSI backend is the model: name ``iSCSI``, capabilities CONFIG|TCPNET|ASYNC, no
files, and the same configuration keys. The location is ``iscsi://[user@]host[:port]/iqn/lun``.
Login does security negotiation (None, CHAP-MD5, mutual CHAP) then operational negotiation;
SCSI commands: TEST UNIT READY, INQUIRY, READ CAPACITY(10/16), READ/WRITE(10/16) with immediate,
unsolicited and R2T-solicited Data-Out, SYNCHRONIZE CACHE; READs and WRITEs pipelined (several
task tags in flight, docs/ioqueue.md). A dropped connection is re-established and the command
retried once; a silent target raises VDTimeoutError after ``Timeout`` ms.
"""
from __future__ import annotations

import urllib.parse

from ...backend import Backend, Cap, Operation, lazy_exports
from ...config import ConfigKey, KeyFlag, ValueType
from ...errors import ConfigError, InvalidArgument

DEFAULT_PORT = 3260
DEFAULT_INITIATOR = "iqn.2026-11.org.vdgui:initiator"


def parse_address(addr: str) -> tuple[str, int]:
    addr = addr.strip()
    if addr.startswith("["):                       # [v6]:port
        host, _, rest = addr[1:].partition("]")
        port = rest.lstrip(":")
    elif addr.count(":") == 1:
        host, port = addr.split(":")
    else:
        host, port = addr, ""
    if not host:
        raise ConfigError(f"TargetAddress {addr!r} has no host")
    try:
        p = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ConfigError(f"TargetAddress {addr!r}: port is not a number") from None
    if not 0 < p < 65536:
        raise ConfigError(f"TargetAddress {addr!r}: port {p} is out of range (1..65535)")
    return host, p


def parse_lun(text: str) -> int:
    t = text.strip()
    if t.lower().startswith("enc"):        # VirtualBox's "enc" prefix: LUN given already encoded
        t = t[3:]
    try:
        lun = int(t, 0)
    except ValueError:
        raise ConfigError(f"LUN {text!r} is not a number") from None
    if not 0 <= lun < 16384:
        raise ConfigError(f"LUN {lun} out of range (0..16383)")
    return lun


M, E = KeyFlag.MANDATORY, KeyFlag.EXPERT
CONFIG_KEYS = (
    ConfigKey("TargetName", None, ValueType.STRING, M, "iSCSI qualified name of the target",
              label="Target name (IQN)"),
    ConfigKey("LUN", "0", ValueType.STRING, M, "logical unit number", label="LUN",
              validator=lambda v: parse_lun(str(v))),
    ConfigKey("TargetAddress", None, ValueType.STRING, M, "host[:port] (default port 3260)",
              label="Target address", validator=lambda v: parse_address(str(v))),
    ConfigKey("InitiatorName", DEFAULT_INITIATOR, ValueType.STRING, KeyFlag.NONE,
              "our iSCSI qualified name", label="Initiator name (IQN)"),
    ConfigKey("InitiatorUsername", None, ValueType.STRING, KeyFlag.NONE, "CHAP user name",
              label="CHAP user name"),
    ConfigKey("InitiatorSecret", None, ValueType.BYTES, KeyFlag.NONE, "CHAP secret",
              label="CHAP secret"),
    ConfigKey("TargetUsername", None, ValueType.STRING, E, "mutual CHAP: the target's user name",
              label="Target's CHAP user name"),
    ConfigKey("TargetSecret", None, ValueType.BYTES, E, "mutual CHAP: the target's secret",
              label="Target's CHAP secret"),
    ConfigKey("WriteSplit", "262144", ValueType.INTEGER, E, "largest write per command",
              minimum=512, maximum=262144, label="Largest write", unit="bytes"),
    ConfigKey("Timeout", "10000", ValueType.INTEGER, E, "how long to wait for the target",
              minimum=100, maximum=3600000, label="Network timeout", unit="ms"),
    ConfigKey("HostIPStack", "1", ValueType.INTEGER, E, "use the host's IP stack",
              minimum=0, maximum=1, label="Use the host's network stack"),
    ConfigKey("DumpMalformedPackets", "0", ValueType.INTEGER, E,
              "log malformed PDUs in hex", minimum=0, maximum=1,
              label="Log malformed packets"),
)


class IscsiBackend(Backend):
    name = "iSCSI"
    description = "Network disk on an iSCSI target"
    aliases = ("iscsi",)
    caps = Cap.CONFIG | Cap.TCPNET | Cap.ASYNC
    extensions = ()
    config_keys = CONFIG_KEYS
    operations = frozenset({Operation.WRITE})
    url_schemes = ("iscsi",)
    impl_module = f"{__name__}.image"

    def compose_location(self, config: dict) -> str:
        user = config.get("InitiatorUsername")
        cred = urllib.parse.quote(str(user), safe="") + "@" if user else ""
        addr = config.get("TargetAddress", "")
        return (
            f"iscsi://{cred}{addr}/"
            f"{urllib.parse.quote(str(config.get('TargetName', '')), safe=':.-')}"
            f"/{config.get('LUN', '0')}"
        )

    def parse_location(self, location: str) -> dict:
        u = urllib.parse.urlsplit(location)
        if u.scheme.lower() != "iscsi":
            raise InvalidArgument(f"{location}: not an iscsi:// URL")
        parts = [urllib.parse.unquote(p) for p in u.path.split("/") if p]
        if not u.hostname or len(parts) != 2:
            raise InvalidArgument(f"{location}: expected iscsi://[user@]host[:port]/target-iqn/lun")
        out = {
            "TargetAddress": u.netloc.rpartition("@")[2],
            "TargetName": parts[0],
            "LUN": parts[1],
        }
        if u.username:
            out["InitiatorUsername"] = urllib.parse.unquote(u.username)
        if u.password:
            raise InvalidArgument(
                "put the CHAP secret in InitiatorSecret (or a property file), not in the URL"
            )
        return out


BACKEND = IscsiBackend()
__getattr__ = lazy_exports(__name__, "image", "pdu")
