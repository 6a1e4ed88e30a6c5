"""What a user reads when something goes wrong: any exception becomes one sentence that says
what was wrong and what to do, and an exit status (2: the input, the options or the machine's
state, which the user can change; 1: a bug). Without torch, so that the command line and the
napari widgets can use it before anything heavy is loaded.

- Errors of napari-vstain's own types (UserError, InputError, CheckpointError, ...) and plain
  ValueErrors whose text is a sentence are the user's: their text is shown as it is.
- OSErrors (permission denied, read-only file system, no space left, ...) get a sentence chosen
  by errno that names the path (exc.filename, exc.filename2).
- Running out of memory (MemoryError, or a RuntimeError such as torch's "CUDA out of memory" or
  "DefaultCPUAllocator: can't allocate memory") gets a sentence naming the options that use
  less memory.
- Anything else is a bug: `internal error (<Type>): <message>; rerun with --debug and report
  it`.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .errors import CheckpointError, InputError, UserError

USER_ERROR = 2
INTERNAL_ERROR = 1

# Texts of Python, numpy and the standard library that are not sentences for a user: a
# ValueError carrying one of them is a bug, not a message.
_RAW_TEXTS = ("invalid literal for", "could not convert", "values to unpack", "[Errno",
              "object has no attribute", "is not subscriptable", "unsupported operand",
              "out of bounds", "could not be broadcast", "cannot reshape", "math domain error",
              "zero-size array", "truth value of an array", "Expecting value", "codec can't",
              "not JSON serializable", "NoneType", "() takes ", "() got an unexpected")
# Words of allocation failures in RuntimeErrors (torch's CPU and CUDA allocators).
_MEMORY_WORDS = ("out of memory", "can't allocate", "cannot allocate", "defaultcpuallocator",
                 "failed to allocate", "not enough memory")
# Options that make a command use less memory, in the order they are suggested.
_MEMORY_OPTIONS = (("tile", "smaller tiles (--tile)"), ("batch_size", "a smaller --batch-size"),
                   ("samples", "fewer samples (--samples)"), ("crop", "a smaller --crop"),
                   ("size", "a smaller --size"))


@dataclass(frozen=True)
class Explanation:
    status: int  # USER_ERROR or INTERNAL_ERROR
    text: str  # one sentence (for INTERNAL_ERROR: "<Type>): <message>" is added by the caller)
    internal: bool


def explain(exc: BaseException, options: Iterable[str] = ()) -> Explanation:
    """The sentence and exit status for `exc`. `options`: the names of the options the
    command has (e.g. vars(args)), so that advice names only options that exist."""
    if is_out_of_memory(exc):
        return Explanation(USER_ERROR, memory_sentence(exc, options), False)
    if isinstance(exc, OSError):
        if exc.errno is not None:
            return Explanation(USER_ERROR, os_error_sentence(exc), False)
        text = _one_line(exc)  # raised by napari-vstain (a sentence) or a library
        if is_sentence(text):
            return Explanation(USER_ERROR, text, False)
        return Explanation(USER_ERROR, f"A file could not be read or written ({text}); check "
                           "the files and the disk and try again.", False)
    if isinstance(exc, ModuleNotFoundError) and exc.name \
            and not exc.name.startswith("napari_vstain"):
        package = exc.name.split(".")[0]
        return Explanation(USER_ERROR, f"This needs the Python package {package}, which is not "
                           f"installed; install it (pip install {package}) or reinstall "
                           "napari-vstain with its dependencies.", False)
    text = _one_line(exc)
    if _is_ours(exc) or (type(exc) is ValueError and is_sentence(text)):
        return Explanation(USER_ERROR, text, False)
    return Explanation(INTERNAL_ERROR, text, True)


def _is_ours(exc: BaseException) -> bool:
    """An error type napari-vstain raises for the user (each message is a sentence)."""
    if isinstance(exc, (UserError, InputError, CheckpointError)):
        return True
    return isinstance(exc, ValueError) and type(exc).__module__.startswith("napari_vstain")


def is_sentence(text: str) -> bool:
    """Whether `text` reads as a message written for a user (ends like a sentence and carries
    no raw Python text such as "invalid literal for int()")."""
    text = text.strip()
    return text.endswith((".", "?", "!")) and not any(raw in text for raw in _RAW_TEXTS)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def record_problem(exc: BaseException) -> str:
    """What is wrong with a stored record (a checkpoint header, a JSON file), in words, for
    the KeyError, ValueError or TypeError that reading it raised: never the bare "'config'"
    of a KeyError or the "Expecting value: line 1 column 1" of the JSON parser."""
    if isinstance(exc, KeyError):
        return f"its entry {exc.args[0]!r} is missing" if exc.args else "an entry is missing"
    if isinstance(exc, ValueError) and type(exc).__name__ == "JSONDecodeError":
        return "it is not valid JSON"
    if isinstance(exc, (TypeError, AttributeError)):
        return "an entry has an unexpected name or type"
    if isinstance(exc, ValueError) and is_sentence(_one_line(exc)):
        return _one_line(exc).rstrip(".")
    return "an entry has a value that cannot be used"


def read_problem(exc: Exception) -> str:
    """What is wrong with a file that could not be read or parsed, in words (no parser
    text): the OSError's sentence, or `record_problem`."""
    return os_error_sentence(exc).rstrip(".") if isinstance(exc, OSError) \
        else record_problem(exc)


# ---- operating-system errors -----------------------------------------------------------------

def os_error_sentence(exc: OSError) -> str:
    """One sentence for an OSError, chosen by its errno, naming its path(s)."""
    names = [os.fsdecode(n) for n in (exc.filename, exc.filename2)
             if isinstance(n, (str, bytes, os.PathLike)) and str(n)]
    path = " -> ".join(names) if names else "a file"
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        return (f"Permission denied for {path}; check the permissions of the file and its "
                "folder, or use another location.")
    if code == errno.EROFS:
        return f"{path} is on a read-only file system; write the output to another location."
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (f"No space left on the disk of {path} (or the disk quota is used up); free "
                "some space or write the output to another disk.")
    if code == errno.ENOENT:
        return f"{path} does not exist; check the path."
    if code == errno.EISDIR:
        return f"{path} is a folder, not a file; give the path of a file."
    if code == errno.ENOTDIR:
        blocking = _file_in_path(names[0]) if names else None
        where = f"{blocking} is a file, not a folder" if blocking else \
            "a part of the path is a file, not a folder"
        return f"{path} cannot be used: {where}; check the path."
    if code == errno.EEXIST:
        kind = " as a folder" if names and Path(names[0]).is_dir() else \
            " as a file" if names and Path(names[0]).exists() else ""
        return f"{path} already exists{kind}; choose another name or remove it."
    if code == errno.ENOTEMPTY:
        return f"The folder {path} is not empty; choose another folder or empty it."
    if code == errno.ENAMETOOLONG:
        return f"The path {path} is too long for the file system; use a shorter name or folder."
    if code == errno.ELOOP:
        return f"{path} is a loop of symbolic links; fix the link or give the real path."
    if code in (errno.EMFILE, errno.ENFILE):
        return (f"Too many files are open (at {path}); close other programs or raise the limit "
                "(ulimit -n) and try again.")
    if code == errno.EIO:
        return (f"Input/output error at {path}: the disk or network share may be failing or "
                "disconnected; check it, or copy the file elsewhere and try again.")
    if code == errno.EFBIG:
        return (f"{path} would be too large for its file system; write it to another file "
                "system (FAT32 holds at most 4 GiB per file).")
    if code in (errno.EBUSY, errno.ETXTBSY):
        return f"{path} is in use by another program; close it there and try again."
    if code in (errno.ENXIO, errno.ENODEV):
        return f"{path} is a device that is not available; give a regular file."
    if code == errno.EXDEV:
        return f"{path} cannot be moved across file systems; write the output on one disk."
    if code is None:
        return f"{path} could not be used ({_one_line(exc)}); check the file and try again."
    reason = (exc.strerror or os.strerror(code) or "system error").rstrip(".")
    return f"{reason} ({path}); check the path and the disk and try again."


def _file_in_path(name: str) -> Optional[str]:
    """The first folder of `name` that is really a file (why ENOTDIR was raised)."""
    for parent in reversed(Path(name).parents):
        if parent.is_file():
            return str(parent)
    return None


# ---- memory ----------------------------------------------------------------------------------

def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError (numpy's too), ENOMEM, or an allocation failure of torch (a RuntimeError
    such as "CUDA out of memory" or "DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOMEM
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(word in text for word in _MEMORY_WORDS)
    return False


def memory_sentence(exc: Optional[BaseException] = None, options: Iterable[str] = ()) -> str:
    """"Ran out of memory (...); use smaller tiles (--tile), ..." with the options the
    command has."""
    options = set(options)
    advice = [text for name, text in _MEMORY_OPTIONS if name in options]
    if advice:
        todo = advice[0] if len(advice) == 1 else ", ".join(advice[:-1]) + " or " + advice[-1]
    else:
        todo = "a smaller input"
    needed = _requested_bytes(str(exc)) if exc is not None else None
    detail = f" (it asked for {needed} more)" if needed else ""
    return (f"Ran out of memory{detail}; use {todo}, or close other programs to free "
            "memory.")


def _requested_bytes(text: str) -> Optional[str]:
    """The size an allocator asked for, from numpy's "Unable to allocate 4.00 GiB" or torch's
    "Tried to allocate 2.00 GiB" / "you tried to allocate 4294967296 bytes"."""
    match = re.search(r"allocate (?:memory: you tried to allocate )?(\d+(?:\.\d+)?) ?"
                      r"(bytes|[KMGTPE]i?B)\b", text, re.IGNORECASE)
    if not match:
        return None
    value, unit = match.groups()
    if unit.lower() == "bytes":
        return format_bytes(int(float(value)))
    return f"{value} {unit}"


def format_bytes(count: float) -> str:
    """4294967296 -> '4.0 GiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


__all__ = ["Explanation", "explain", "is_sentence", "record_problem", "os_error_sentence",
           "is_out_of_memory",
           "memory_sentence", "format_bytes", "USER_ERROR", "INTERNAL_ERROR"]
