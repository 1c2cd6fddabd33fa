"""vnetbackend: eBPF steering with per-packet hash reports for virtio-net RSS on a tap."""

__version__ = "0.1.0"
