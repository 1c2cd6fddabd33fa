"""A real Linux guest on QEMU with virtio-net RSS and hash reports, observed from inside.

`guest.boot_guest` creates the tap, starts QEMU on its queue fds and waits for the guest's
own ready signal; `agent` runs commands in the guest; `ethtool` reads and sets its RSS
configuration; `observer` records what the guest received (queue, hash); `injector`
sends crafted frames into the tap; `check` compares both with the reference model.
"""
