"""One error type for bad input, so every entry point can print a single line and exit.

Readers raise :class:`DataError` with the offending file and the problem; the CLIs catch it and print
``error: <file>: <problem>`` instead of a traceback.  Dataset ``__getitem__`` implementations validate
eagerly in ``__init__`` (or re-raise as ``DataError``) so that a DataLoader worker never surfaces a raw
traceback from deep inside h5py or PyAV.
"""

from __future__ import annotations

import os


class DataError(ValueError):
    """A problem with an input file, named with its path."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)
