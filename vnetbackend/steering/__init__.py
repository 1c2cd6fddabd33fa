"""The eBPF steering program: RSS queue choice in the tap plus a per-packet hash report."""

from vnetbackend.steering.program import (
    Counters,
    MapsInconsistent,
    SteeringError,
    SteeringProgram,
    SteeringState,
)
from vnetbackend.steering.reports import Report, ReportReader
from vnetbackend.steering.testrun import RunResult, prog_test_run

__all__ = [
    "Counters",
    "MapsInconsistent",
    "Report",
    "ReportReader",
    "RunResult",
    "SteeringError",
    "SteeringProgram",
    "SteeringState",
    "prog_test_run",
]
