"""The exit codes of the ``infermill`` command: one table, used by every command, by the
workers a ``--workers`` parent, a Slurm array or Ray runs, and by their parents to decide
whether a worker is started again.

A command's exit code is :func:`exit_code` of the error that ended it; the README's "Exit
codes" table lists the same codes and meanings.
"""

from __future__ import annotations

from enum import IntEnum

from infermill.errors import BudgetExceededError, ConfigError, QueueCorruptError, UnitsFailedError


class ExitCode(IntEnum):
    """What an ``infermill`` command's exit code means."""

    #: the job is complete (``run``), or the command did what it was asked
    OK = 0
    #: the run stopped on an error (a server that failed for good, a storage error, workers that
    #: died in vain): the checkpoint is kept, and the same command resumes; ``status --verify``:
    #: a done unit lost its output
    FAILED = 1
    #: the command or its job cannot run as given, and nothing ran: a bad option or job file key, an
    #: input that cannot be read or planned, a changed job refused, a corrupt file of the queue
    USAGE = 2
    #: units failed for good (their documents, or their workers, every attempt); the others are
    #: done, and the same command retries only the failed ones
    UNITS_FAILED = 3
    #: the job's spend or forecast passed its ``cost.budget``: its workers gave their units back, what
    #: they finished is kept; raise the budget (``--set cost.budget=...``) and run it again to go on
    BUDGET = 4
    #: stopped by SIGINT or SIGTERM; the checkpoint is kept
    INTERRUPTED = 130


#: exit codes of a worker that mean "do not start it again": done, a usage error, units failed
#: (the job's fault, not the worker's), over budget, stopped on request
FINAL = frozenset({ExitCode.OK, ExitCode.USAGE, ExitCode.UNITS_FAILED, ExitCode.BUDGET, ExitCode.INTERRUPTED})


def exit_code(error: BaseException) -> ExitCode:
    """The exit code of a command that ``error`` ended."""
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    if isinstance(error, (ConfigError, QueueCorruptError)):
        return ExitCode.USAGE
    if isinstance(error, UnitsFailedError):
        return ExitCode.UNITS_FAILED
    if isinstance(error, BudgetExceededError):
        return ExitCode.BUDGET
    return ExitCode.FAILED  # a server, a storage or a worker error: resumable
