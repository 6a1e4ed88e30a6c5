"""The state of a run folder and the lock that keeps a second training process out of it.

A folder holds a new run (nothing yet), a run that stopped before its first checkpoint
(config.json without checkpoint: started again by the same command), a resumable run
(checkpoint.safetensors: continued by --resume) or a model without checkpoint (refused)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .settings import CHECKPOINT_FILE, CONFIG_FILE, MODEL_FILE


def check_run_folder(out: Path, resume: bool) -> bool:
    """Refuse what cannot be done in folder `out` with a sentence saying what can; True when a
    new run starts again a run that stopped before its first checkpoint (its config.json is
    replaced)."""
    out = Path(out)
    checkpoint, config, model = (out / CHECKPOINT_FILE, out / CONFIG_FILE, out / MODEL_FILE)
    if resume:
        if checkpoint.is_file():
            return False
        if config.is_file():
            raise FileNotFoundError(f"Nothing to resume in {out}: its run stopped before its "
                                    f"first checkpoint ({CHECKPOINT_FILE}); run the same "
                                    "command without --resume to start it again.")
        raise FileNotFoundError(f"Nothing to resume: {out} holds no training run (no "
                                f"{CHECKPOINT_FILE}); start one without --resume.")
    if checkpoint.exists():
        raise FileExistsError(f"{out} already holds a training run; continue it with --resume "
                              "or choose another --out folder.")
    if model.exists():
        raise FileExistsError(f"{out} already holds a trained model ({MODEL_FILE}) but no "
                              "checkpoint to continue from; choose another --out folder.")
    return config.exists()


@contextmanager
def run_folder_lock(out: Path, active: bool = True) -> Iterator[None]:
    """Hold folder `out` (made if missing) for one training process: a second process (a new
    run, or --resume) in the same folder is refused instead of mixing its files with the
    first's. The operating system drops the lock when the process ends, also when it is
    killed, so no stale lock is ever left. A folder this call made is removed again when the
    run fails before writing anything into it. (No lock where fcntl is missing: Windows.)"""
    out = Path(out)
    if not active:
        yield
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder for the run (--out).")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        fcntl = None
    handle = os.open(out, os.O_RDONLY) if fcntl else None
    try:
        if fcntl:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"Another training process is using {out}; wait for it to end "
                                "or choose another --out folder.") from None
            except OSError:
                pass  # a file system without locks (some network mounts): run unlocked
        yield
    except BaseException:
        if made:
            try:
                out.rmdir()  # only if still empty
            except OSError:
                pass
        raise
    finally:
        if handle is not None:
            os.close(handle)
