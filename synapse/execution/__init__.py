"""Task execution on execution nodes: the sandbox a worker runs one task in.

``choose_driver()`` gives the best driver this machine supports (bubblewrap, else a plain
process); ``driver.run(job)`` runs a `Job` to its end and returns its `Outcome`. DESIGN.md
says what each driver isolates and how each limit is enforced."""

from synapse.execution.drivers import BwrapDriver, ContainerDriver, ProcessDriver, choose_driver
from synapse.execution.sandbox import (
    REASONS,
    Driver,
    Grants,
    Job,
    JobError,
    Limits,
    Outcome,
    SandboxUnavailable,
    validate_job,
)

__all__ = [
    "REASONS",
    "BwrapDriver",
    "ContainerDriver",
    "Driver",
    "Grants",
    "Job",
    "JobError",
    "Limits",
    "Outcome",
    "ProcessDriver",
    "SandboxUnavailable",
    "choose_driver",
    "validate_job",
]
