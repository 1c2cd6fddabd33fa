"""Benchmarks that print their figures as one JSON object.

Each benchmark is a module here with ``add_arguments(parser)`` and
``run(args) -> dict``; `BENCHMARKS` maps the command-line name to the module.
"""

BENCHMARKS = {
    "reference": "vnetbackend.bench.reference",
    "check": "vnetbackend.bench.check",
    "steering": "vnetbackend.bench.steering",
    "guest": "vnetbackend.bench.guest",
    "mirror": "vnetbackend.bench.mirror",
}
