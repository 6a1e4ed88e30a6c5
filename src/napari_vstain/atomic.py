"""Writing results so that nothing is lost, without torch.

A result (one file, or several that belong together: a stain and its CV map, the files of a
demo folder) is one transaction (`result_transaction`):
- every file is written to a temporary beside its destination, named
  `.<name>.<label>.<host>-<pid>.<random>.vstain-partial`, and put in place only when all are
  written;
- an output that is one of the run's inputs is refused, with or without overwriting;
- each destination is locked for the run (`.<name>.vstain-lock`, created exclusively), so two
  runs on the same output refuse cleanly instead of deleting each other's files;
- the lock records the renames before they start, so a run killed between two renames is
  completed by the next run that touches the same output (the whole new result), and a run
  killed before that leaves the whole old result; temporaries and locks of killed runs are
  removed by the next run, which says so.
"""

from __future__ import annotations

import contextvars
import json
import os
import secrets
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from .errors import OutputError

# The transaction open in this thread, if any: `atomic_write` of one of its outputs joins it,
# so writers of single files (write_ome_tiff, write_png, ...) compose into one result.
_OPEN = contextvars.ContextVar("napari_vstain_transaction", default=None)

TEMP_SUFFIX = ".vstain-partial"
# Outputs with these suffixes are folders (OME-Zarr containers), put in place whole like files.
FOLDER_SUFFIXES = (".zarr",)
LOCK_SUFFIX = ".vstain-lock"
_HOST = socket.gethostname().split(".")[0].replace("-", "_") or "host"


def is_folder_output(path) -> bool:
    return str(path).lower().rstrip("/").endswith(FOLDER_SUFFIXES)


def _remove(path: Path) -> None:
    """Remove a temporary: a file, or a folder output's whole tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _owner() -> str:
    return f"{_HOST}-{os.getpid()}"


def _is_alive(owner: str) -> bool:
    """Whether the process that wrote `owner` (host-pid) may still run. A process on another
    host cannot be checked: it counts as alive."""
    host, _, pid = owner.rpartition("-")
    if host != _HOST or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temporary_name(output: Path, label: str, owner: str) -> Path:
    return output.with_name(f".{output.name}.{label}.{owner}.{secrets.token_hex(4)}"
                            f"{TEMP_SUFFIX}")


def _owner_of_temporary(path: Path) -> str:
    """The host-pid in a `_temporary_name`."""
    parts = path.name[: -len(TEMP_SUFFIX)].split(".")
    return parts[-2] if len(parts) >= 4 else ""


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_inputs(outputs: Iterable, inputs: Iterable) -> None:
    """Refuse an output that is one of the inputs (the same path or the same file), even
    with overwriting allowed: a result never replaces what it was made from."""
    inputs = [Path(p) for p in inputs if p is not None]
    for output in outputs:
        for source in inputs:
            if _same_file(Path(output), source):
                raise OutputError(f"{output} is also an input of this run ({source}); "
                                  "write the result to another file.")


class _Transaction:
    def __init__(self, outputs: list, say: Callable[[str], None]):
        self.outputs, self.say = outputs, say
        self.owner = _owner()
        self.temporaries: dict = {}  # output -> temporary
        self.obsolete: list = []  # removed once the result is in place

    def temporary(self, output) -> Path:
        """The temporary that stands for `output` until the transaction commits; write the
        file there (whole), the transaction puts it in place."""
        output = Path(os.path.abspath(output))
        if output not in self.outputs:
            raise ValueError(f"{output} is not an output of this transaction.")
        if output not in self.temporaries:
            self.temporaries[output] = _temporary_name(output, "new", self.owner)
        return self.temporaries[output]

    def remove_after_commit(self, path) -> None:
        """Remove `path` (a file or folder the result was made from, such as the finished
        blocks of a whole-slide run) once the result is in place; a run killed during its
        commit has it removed by the next run, with the rest of its commit."""
        self.obsolete.append(Path(os.path.abspath(path)))

    def scratch(self, output, label: str) -> Path:
        """A scratch file beside `output` (removed at the end, and by the next run after a
        kill): e.g. the CV rows waiting while the stain is streamed."""
        path = _temporary_name(Path(os.path.abspath(output)), label, self.owner)
        self.temporaries[path] = path
        return path


def _lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}{LOCK_SUFFIX}")


def _write_lock(output: Path, record: dict) -> None:
    """Replace the lock's content in one step (the lock keeps existing)."""
    tmp = _temporary_name(output, "lock", record["owner"])
    with open(tmp, "w") as handle:
        handle.write(json.dumps(record))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, _lock_path(output))


def _roll_forward(moves: list) -> list:
    """Finish the renames of a commit that a killed run recorded: the whole new result."""
    return [str(move[1]) for move in moves if _put_in_place(*move)]


def _clear_stale(output: Path, say) -> None:
    """Remove what killed runs left for `output`: finish their commit if they had started
    one, then remove their temporaries and lock."""
    lock = _lock_path(output)
    if lock.exists():
        try:
            record = json.loads(lock.read_text() or "{}")
        except (OSError, ValueError):
            record = {}
        owner = record.get("owner", "")
        if owner and _is_alive(owner):
            raise OutputError(f"Another vstain run ({owner}) is writing {output}; wait for it "
                              f"to finish or choose another name. If no run is active, delete "
                              f"{lock}.")
        finished = _roll_forward(record.get("commit") or [])
        if finished:
            say(f"Completed the result of a killed run: {', '.join(finished)}.")
        if record.get("commit"):
            for path in record.get("remove") or []:
                _remove(Path(path))
        lock.unlink(missing_ok=True)
    stale = [p for p in output.parent.glob(f".{output.name}.*{TEMP_SUFFIX}")
             if not _is_alive(_owner_of_temporary(p))]
    for path in stale:
        _remove(path)
    if stale:
        say(f"Removed {len(stale)} temporary file(s) of killed runs beside {output}.")


def check_places(outputs: Iterable) -> None:
    """Refuse, before any work, outputs that cannot be written where they are asked for."""
    for output in outputs:
        check_place(output, folder=is_folder_output(output))


def check_place(output, option: Optional[str] = None, folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written where it is asked for: a
    folder given as a file name (or a file as a `folder` output), a path through a file, a
    folder in which files cannot be created. `option`: the command's flag, named in the
    message. Returns the path."""
    given = Path(output).expanduser()
    output = Path(os.path.abspath(given))
    named = f"{option} {given}" if option else str(output)
    another = f"choose another {option}" if option else "choose another place for the output"
    if not folder and output.is_dir():
        hint = f", e.g. {given / 'result.ome.tif'}" if option else " for the output"
        raise OutputError(f"{named} is a folder; give a file name{hint}.")
    if folder and output.exists() and not output.is_dir():
        raise OutputError(f"{named} is a file, but a folder is needed; {another}.")
    existing = next(p for p in (output, *output.parents) if p.exists()) if folder else \
        next(p for p in (output.parent, *output.parent.parents) if p.exists())
    if not existing.is_dir():
        raise OutputError(f"{named} cannot be written: {existing} is a file, not a folder; "
                          f"{another}.")
    probe = existing / f".vstain-probe.{_owner()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    try:  # the folder may look writable and not be (read-only mounts, /proc, ...)
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OutputError(f"Cannot write {output}: files cannot be created in {existing} "
                          f"({reason}); {another}.") from None
    return given


def recover_killed_runs(outputs: Iterable, say: Optional[Callable[[str], None]] = None
                        ) -> None:
    """Before looking at existing outputs: complete the commit of a run that was killed
    while putting its files in place, and remove the temporaries and locks of killed runs.
    Raises OutputError while a live run is writing one of `outputs`."""
    for output in outputs:
        output = Path(os.path.abspath(output))
        if output.parent.is_dir():
            _clear_stale(output, say or _say)


@contextmanager
def result_transaction(outputs: Iterable, inputs: Iterable = (), overwrite: bool = False,
                       say: Optional[Callable[[str], None]] = None
                       ) -> Iterator[_Transaction]:
    """Write the files `outputs` as one result. Inside the block, write each output's file to
    `tx.temporary(output)`; when the block ends normally every temporary is put in place
    together, replacing existing files only with `overwrite`. When it raises, nothing is
    changed and the temporaries are removed. `inputs`: files this result is made from,
    which it may never replace. `say`: where notices go (default: standard error)."""
    say = say or _say
    outputs = [Path(os.path.abspath(p)) for p in outputs]
    if len({p.resolve() for p in outputs}) != len(outputs):
        raise OutputError(f"Two outputs of this run are the same file: "
                          f"{', '.join(map(str, outputs))}; give each its own name.")
    refuse_inputs(outputs, inputs)
    check_places(outputs)
    for output in outputs:
        output.parent.mkdir(parents=True, exist_ok=True)
    tx = _Transaction(outputs, say)
    locks: list = []
    try:
        for output in sorted(outputs):  # one order for every run: no lock-order deadlock
            _clear_stale(output, say)
            lock = _lock_path(output)
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise OutputError(f"Another vstain run is writing {output}; wait for it to "
                                  "finish or choose another name.") from None
            except OSError as exc:  # a read-only or special folder (/proc, a full disk...)
                raise OutputError(f"Cannot create files in {output.parent} "
                                  f"({os.strerror(exc.errno) if exc.errno else exc}); choose "
                                  "another folder for the output.") from exc
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps({"owner": tx.owner}))
            locks.append(lock)
        if not overwrite:
            for output in outputs:
                if output.exists():
                    raise FileExistsError(f"{output} already exists; choose another name or "
                                          "allow overwriting (--overwrite).")
        opened = _OPEN.set(tx)
        try:
            yield tx
        finally:
            _OPEN.reset(opened)
        _commit(tx)
    finally:
        for temporary in tx.temporaries.values():
            _remove(temporary)
        for lock in locks:
            lock.unlink(missing_ok=True)


def _commit(tx: _Transaction) -> None:
    """Put every temporary in place. The renames are recorded in the locks first, so a kill
    between two of them is completed by the next run (`_clear_stale`)."""
    missing = [str(o) for o in tx.outputs if o not in tx.temporaries
               or not tx.temporaries[o].exists()]
    if missing:
        raise RuntimeError(f"Nothing was written for {', '.join(missing)}.")
    umask = os.umask(0)
    os.umask(umask)
    moves = []
    for output in tx.outputs:
        temporary = tx.temporaries[output]
        if temporary.is_dir():
            # a rename does not replace a folder: the old one is first moved aside (into a
            # temporary of this run, removed afterwards)
            moves.append([str(temporary), str(output), str(tx.scratch(output, "old"))])
            continue
        os.chmod(temporary, 0o666 & ~umask)  # the usual mode of a new file
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())  # on disk before the renames are recorded
        moves.append([str(temporary), str(output)])
    for output in tx.outputs:
        _write_lock(output, {"owner": tx.owner, "commit": moves,
                             "remove": [str(p) for p in tx.obsolete]})
    for move in moves:
        _put_in_place(*move)
    for path in tx.obsolete:
        _remove(path)


def _put_in_place(temporary, final, aside=None) -> bool:
    """Rename `temporary` to `final` if it is still there (a folder output's old tree moved to
    `aside` first). Returns whether it moved."""
    if not Path(temporary).exists():
        return False
    if aside is not None and Path(final).exists():
        os.replace(final, aside)
    os.replace(temporary, final)
    return True


def atomic_write(path, write: Callable[[Path], object], overwrite: bool = False,
                 inputs: Iterable = ()) -> Path:
    """One file as a result: call write(temporary_path), then put it in place. Never a
    half-written file; an existing file is replaced only with `overwrite`. Inside an open
    `result_transaction` that has `path` among its outputs, the file joins that result."""
    path = Path(path)
    open_transaction = _OPEN.get()
    if open_transaction is not None and Path(os.path.abspath(path)) in open_transaction.outputs:
        write(open_transaction.temporary(path))  # put in place with the rest of the result
        return path
    with result_transaction([path], inputs, overwrite) as tx:
        write(tx.temporary(path))
    return path
