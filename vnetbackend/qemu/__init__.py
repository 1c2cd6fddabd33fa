"""Talking to QEMU: launching it, its QMP monitor, the device's features and RSS state."""
