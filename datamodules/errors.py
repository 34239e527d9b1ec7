"""One error type for bad input, so every entry point can print a single line and exit.

Readers raise :class:`DataError` with the offending file (or option) and the problem; the CLIs catch it and
print ``error: <file>: <problem>`` instead of a traceback.  Dataset ``__getitem__`` implementations validate
eagerly in ``__init__`` or re-raise read failures as ``DataError``.  A ``DataError`` raised inside a DataLoader
worker reaches the main process re-created by torch from its formatted traceback (``Caught DataError in
DataLoader worker process 0. Original Traceback ...``); :class:`DataError` accepts that single argument and
keeps only the original one-line message, so worker errors print as one line too.
"""

from __future__ import annotations

import errno
import os

# What torch's ExceptionWrapper puts before the worker's traceback.
_WORKER_PREFIX = "Caught DataError in DataLoader worker"

# errno values that can only mean "the output could not be written": disk full, quota, file too large,
# read-only filesystem.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class DataError(ValueError):
    """A problem with an input file (or an option), named with its path (or the option's name)."""

    def __init__(self, path: str | os.PathLike | None, problem: str | None = None):
        if problem is None:  # DataError(message): torch re-raising a worker's error, or a bare message
            path, problem = None, _original_message(str(path))
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # pickles (DDP spawn, worker queues) with both fields
        return (type(self), (self.path, self.problem))


class OptionError(DataError):
    """A bad value of a setting: ``path`` is the setting's name (``img_size``), which ``lightning fit`` prefixes
    with where it sits in the config (``data.init_args.img_size``)."""


def _original_message(text: str) -> str:
    """The worker's own one-line message out of torch's ``Caught DataError in DataLoader worker ...`` text: the
    last line that starts with the exception's qualified name."""
    if not text.startswith(_WORKER_PREFIX):
        return text
    for line in reversed(text.splitlines()):
        for name in ("datamodules.errors.DataError: ", "DataError: "):
            if line.startswith(name):
                return line[len(name) :]
    return text.splitlines()[-1].strip() or text


def write_error(path: str | os.PathLike, e: OSError) -> DataError:
    """One-line :class:`DataError` for an output that could not be written (disk full, read-only, ...)."""
    reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    return DataError(path, f"could not be written ({reason}); nothing was left in its place")


def is_write_error(e: BaseException) -> bool:
    """Whether ``e`` is an OS error of writing (see :data:`WRITE_ERRNOS`), also as h5py words it (h5py raises
    plain ``OSError`` with the errno only in its message)."""
    if not isinstance(e, OSError):
        return False
    if e.errno in WRITE_ERRNOS:
        return True
    text = str(e)
    return any(os.strerror(n) in text for n in WRITE_ERRNOS)
