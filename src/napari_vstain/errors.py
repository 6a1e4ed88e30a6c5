"""The error types users see, in one small module without torch, so the command line and the
napari widgets can catch them without importing the engine. Each message is a sentence that
says what was wrong and what to do."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input; printed as one sentence, without a traceback."""


class InputError(ValueError):
    """An input image that cannot be used as it is."""


class MissingInputError(InputError, FileNotFoundError):
    """An input file that does not exist."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, unsafe or of an unknown layout."""


class Cancelled(Exception):
    """Raised inside a run when its progress callback asks to stop."""


class OutputError(ValueError):
    """An output that cannot be written as asked: it is an input, a folder, or another run is
    writing it."""


class NonFiniteOutputError(ValueError):
    """The network gave NaN or infinite values: the result is not written or shown."""

    def __init__(self, where: str):
        super().__init__(f"The network produced NaN or infinite values ({where}); nothing was "
                         "written. The checkpoint may be damaged (NaN weights) or the input "
                         "extreme: check the checkpoint with a known image.")
