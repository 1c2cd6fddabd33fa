"""Which virtio-net features QEMU offers and which the guest driver took, over QMP.

``x-query-virtio`` lists the virtio devices with their QOM paths;
``x-query-virtio-status {path}`` gives ``host-features`` (offered by the device) and
``guest-features`` (accepted by the driver), each a list of strings such as
``"VIRTIO_NET_F_RSS: RSS RX steering supported"`` under ``dev-features`` and
``transports``, plus the device status bits. A driver that is not loaded yet, or that
declined a feature, is a state reported here, not an error.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from qemu.qmp import QMPClient

from vnetbackend.qemu.device import NetDevice
from vnetbackend.qemu.qmp import QemuReplyError, call, reply_field

RSS = "VIRTIO_NET_F_RSS"
HASH_REPORT = "VIRTIO_NET_F_HASH_REPORT"
MQ = "VIRTIO_NET_F_MQ"
CTRL_VQ = "VIRTIO_NET_F_CTRL_VQ"
FEATURES_OK = "VIRTIO_CONFIG_S_FEATURES_OK"
DRIVER_OK = "VIRTIO_CONFIG_S_DRIVER_OK"
#: What vnetbackend needs the device to offer, and wants the guest to take.
WANTED_FEATURES = (RSS, HASH_REPORT, MQ, CTRL_VQ)


class Negotiation(enum.Enum):
    """Where a feature stands between device and driver."""

    NOT_OFFERED = "not offered by the device"
    DRIVER_NOT_READY = "the driver has not finished feature negotiation"
    DECLINED = "offered, but the driver did not take it"
    NEGOTIATED = "negotiated"


def feature_names(descriptions: Iterable[str]) -> frozenset[str]:
    """``{"VIRTIO_NET_F_RSS", ...}`` from QEMU's ``"NAME: description"`` strings."""
    return frozenset(text.split(":", 1)[0].strip() for text in descriptions)


@dataclass(frozen=True, slots=True)
class VirtioFeatures:
    """Offered and negotiated feature names (device and transport bits) of one device,
    and its status bits; empty until first read."""

    offered: frozenset[str] = frozenset()
    negotiated: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()

    @property
    def features_ok(self) -> bool:
        """Whether the driver completed feature negotiation (the negotiated set is final)."""
        return FEATURES_OK in self.statuses

    @property
    def driver_ok(self) -> bool:
        return DRIVER_OK in self.statuses

    def state(self, feature: str) -> Negotiation:
        if feature not in self.offered:
            return Negotiation.NOT_OFFERED
        if feature in self.negotiated:
            return Negotiation.NEGOTIATED
        if not self.features_ok:
            return Negotiation.DRIVER_NOT_READY
        return Negotiation.DECLINED

    def view(self) -> dict[str, object]:
        """The wanted features' side of this, JSON-ready, for ``query-vnet`` and events."""
        return {
            "offered": sorted(f for f in self.offered if f in WANTED_FEATURES),
            "negotiated": sorted(f for f in self.negotiated if f in WANTED_FEATURES),
            "missing-offers": sorted(set(WANTED_FEATURES) - self.offered),
            "driver-ready": self.features_ok,
            "driver-ok": self.driver_ok,
        }


_STATUS = "x-query-virtio-status"


def _strings(section: object, keys: Iterable[str]) -> list[str]:
    """The strings listed under *keys* of a reply *section*; lists must hold strings."""
    strings: list[str] = []
    for key in keys:
        if isinstance(section, dict) and key in section:
            value = reply_field(section, key, list, _STATUS)
            if not all(isinstance(item, str) for item in value):
                raise QemuReplyError(_STATUS, f"{key!r} holds a value that is not a string")
            strings.extend(value)
    return strings


async def query_features(qmp: QMPClient, device: NetDevice) -> VirtioFeatures:
    """The features of *device* as QEMU reports them now.

    Raises `QemuCallFailed` when QEMU does not answer or answers out of shape.
    """
    status = await call(qmp, _STATUS, {"path": device.virtio_path})
    sections = {key: reply_field(status, key, dict, _STATUS)
                for key in ("host-features", "guest-features", "status")}
    feature_keys = ("dev-features", "transports")
    return VirtioFeatures(
        offered=feature_names(_strings(sections["host-features"], feature_keys)),
        negotiated=feature_names(_strings(sections["guest-features"], feature_keys)),
        statuses=feature_names(_strings(sections["status"], ("statuses",))),
    )
