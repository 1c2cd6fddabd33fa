"""The daemon: its life cycle next to one QEMU (`lifecycle`), starting it with a QEMU it
launches or next to a running one (`launch`), its monitor's commands (`monitor`) and the
QMP server they run on (`qmp_server`)."""
