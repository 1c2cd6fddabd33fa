"""Benchmarks that print their figures as one JSON object.

Each benchmark is a module here with ``add_arguments(parser)`` and
``run(args) -> dict``. `BENCHMARKS` maps the command-line name to the module and a
one-line summary, so that the command's parser is built without importing any of them
(some pull in bcc or the whole test bed).
"""

BENCHMARKS = {
    "reference": ("vnetbackend.bench.reference",
                  "frames per second through the reference model"),
    "check": ("vnetbackend.bench.checker", "reports judged per second by the hash checker"),
    "steering": ("vnetbackend.bench.steering",
                 "ns per frame in the steering program, beside an empty program"),
    "guest": ("vnetbackend.bench.guest",
              "the test guest's boot time and frames checked per second"),
    "recorder": ("vnetbackend.bench.recorder",
                 "records per second from the guest's recorder over its virtio-serial port"),
    "mirror": ("vnetbackend.bench.mirror",
               "latency from QEMU's RSS trace event to the program attached again"),
    "scale": ("vnetbackend.bench.scale",
              "one serve daemon: resident memory and time to add a VM at 1, 4 and 16 VMs"),
}
