"""``usnodule``: the project's command line for every step that is not a Lightning fit.

Each stage module registers one subcommand through ``add_parser(sub)`` and runs it with ``run(args)``.
Bad input stops with one line (``error: <file>: <problem>``) and exit status 2, never a traceback: a bad
option too (``error: usnodule predict: argument --batch-size: must be >= 1, got 0``; the usage only with
``--help``), an output that cannot be written (disk full, read-only) and any other ``OSError`` that names a
file.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from datamodules.errors import DataError

# One line per subcommand; its module in stages/ is the name with "-" -> "_" (or the name in MODULES).
COMMANDS = (
    "synth",
    "split",
    "masks",
    "embeddings",
    "crossfit-halves",
    "baselines",
    "report",
    "report-multiclass",
    "predict",
    "predict-pair",
    "import",
    "import-stills",
    "export",
    "still-masks",
    "shape-forest",
    "roi-predict",
    "explain",
    "report-sweep",
    "shift-paired",
    "feature-forest",
    "predict-still",
)
MODULES = {"import": "import_layout"}  # `import` is a Python keyword: no module stages/import.py


def module_name(command: str) -> str:
    return f"stages.{MODULES.get(command, command.replace('-', '_'))}"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``error: <prog>: <problem>``) and exit status 2; the
    usage itself is printed by ``--help`` only.  Subcommand parsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (`{self.prog} --help` lists the options)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` just that subcommand (importing one stage module, not all: some
    pull in torch and Lightning, which costs seconds at start)."""
    parser = OneLineParser(
        prog="usnodule",
        description="Ultrasound nodule malignancy pipeline: data, folds and the non-fit stages. "
        "Fits run through `lightning fit -c conf/<stage>.yaml`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS if only is None else (only,):
        importlib.import_module(module_name(name)).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    try:
        args.func(args)
    except DataError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        if e.filename is None and e.errno is None:
            raise  # not a file problem: a bug to see whole
        print(f"error: {one_line(os_error(e))}", file=sys.stderr)
        raise SystemExit(2) from None


def os_error(e: OSError) -> str:
    """``<file>: <reason>`` of an ``OSError`` (disk full, permission denied, ...)."""
    reason = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
    if e.errno == errno.ENOSPC:
        reason += " (free some space and rerun)"
    return f"{e.filename}: {reason}" if e.filename else reason


def one_line(text: str) -> str:
    """``text`` with its line breaks folded into spaces: an error is one line on stderr."""
    return " ".join(text.split()) if "\n" in text else text
