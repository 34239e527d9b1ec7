"""``usnodule``: the project's command line for every step that is not a Lightning fit.

Each stage module registers one subcommand through ``add_parser(sub)`` and runs it with ``run(args)``.
Bad input stops with one line (``error: <file>: <problem>``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from datamodules.errors import DataError

# One line per subcommand; its module in stages/ is the name with "-" -> "_".
COMMANDS = (
    "synth",
    "split",
    "masks",
    "embeddings",
    "baselines",
    "report",
    "predict",
    "import-stills",
    "still-masks",
    "shape-forest",
    "roi-predict",
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` just that subcommand (importing one stage module, not all: some
    pull in torch and Lightning, which costs seconds at start)."""
    parser = argparse.ArgumentParser(
        prog="usnodule",
        description="Ultrasound nodule malignancy pipeline: data, folds and the non-fit stages. "
        "Fits run through `lightning fit -c conf/<stage>.yaml`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS if only is None else (only,):
        importlib.import_module(f"stages.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    try:
        args.func(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
