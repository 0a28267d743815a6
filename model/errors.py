"""The project's one error family: every failure a user can cause or fix is a ``LabError``.

Each subclass also derives from the builtin it refines, so ``except ValueError`` keeps working.
"""
from __future__ import annotations


class LabError(Exception):
    """Base of every error the package raises on purpose; the message says what to do."""


class ModelLoadError(LabError, RuntimeError):
    """A model or checkpoint could not be loaded; the message names the problem."""


class ModelSaveError(LabError, RuntimeError):
    """A model could not be saved (e.g. its weights are not finite); the message says why."""


class EngineInputError(LabError, ValueError):
    """Invalid generation input or settings; the message says what is accepted."""


class EngineFullError(LabError, RuntimeError):
    """The engine refuses a request because a bound is reached (queue full); retry later."""


class DataError(LabError, RuntimeError):
    """A corpus source could not be fetched, read or split; the message says which and why."""


class TraceFormatError(LabError, ValueError):
    """A trace file that is not a trace of a supported schema version; the message says what is wrong."""
