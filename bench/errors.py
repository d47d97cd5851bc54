"""The errors that the command line turns into one ``error:`` line (and exit code 2 unless said otherwise).

Every input problem the suite can detect before training (a bad number, an unknown name, a folder it may
not write, a file it cannot read) is one of these, raised with a message that fits on one line and names
what to change.  This module imports nothing of the project, so every layer can raise them.
"""

from __future__ import annotations

import signal

__all__ = ["BenchError", "UnknownOptimizerError", "OptimizerSpecError", "ResultsError", "RegressError",
           "StoreWriteError", "RunInterrupted", "exit_code_for_signal"]


class BenchError(ValueError):
    """A bad input to the benchmark; the message is one line, fit for the command line."""

    exit_code = 2


class UnknownOptimizerError(BenchError, LookupError):
    """An optimizer name that is neither registered nor an importable optimizer class."""

    def __str__(self) -> str:      # LookupError would quote the message
        return str(self.args[0])


class OptimizerSpecError(BenchError):
    """A malformed ``name:key=value`` choice, an unknown key or a value the optimizer rejects."""


class ResultsError(BenchError):
    """A results folder or file that cannot be read, or may not be written into."""


class RegressError(BenchError):
    """A regression baseline that is missing, unreadable or does not fit the suite."""


class StoreWriteError(BenchError):
    """Writing into a results folder failed while a run was under way (a full disk, say).

    Everything written before is intact (every file is replaced atomically); exit code 1, because the
    input was fine and the run itself could not finish.
    """

    exit_code = 1


def exit_code_for_signal(signum: int) -> int:
    """The shell's convention: 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(signum)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a benchmark; everything finished or logged so far is in ``out``."""

    def __init__(self, out: object, signum: int = signal.SIGINT) -> None:
        super().__init__(str(out))
        self.out = out
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return exit_code_for_signal(self.signum)
