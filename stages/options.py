"""argparse ``type=`` functions shared by the ``usnodule`` subcommands: a bad option value is refused while the
command line is parsed (one line, exit status 2, before any data is read or any model is loaded), not by a
traceback from deep inside the step."""

from __future__ import annotations

import argparse
import string
from pathlib import Path

SEED_MAX = 2**32 - 1  # numpy's seeds: 0 .. 2**32 - 1


def int_at_least(low: int):
    """An integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = int_at_least(1)
count = int_at_least(0)  # workers, fold numbers


def seed(text: str) -> int:
    """A random seed: an integer in 0 .. 2**32 - 1 (numpy refuses any other)."""
    value = count(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be <= {SEED_MAX}, got {value}")
    return value


def fraction(text: str) -> float:
    """A probability threshold in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def output_file(text: str) -> Path:
    """A file to write: not an existing folder, and not a name ending in a path separator."""
    path = Path(text)
    if path.is_dir() or text.endswith(("/", "\\")):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; name the output file inside it")
    if path.parent.exists() and not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{str(path.parent)!r} is a file, not a folder")
    return path


def fold_pattern(text: str) -> str:
    """A path pattern whose only fields are ``{fold}`` and ``{runs}`` (a fixed path is allowed: one fold's
    file; the consumers check the fold each file records)."""
    check_pattern(text)
    return text


def check_pattern(text: str, fields: tuple[str, ...] = ("runs", "fold")) -> None:
    """Raise ``ArgumentTypeError`` unless ``text`` formats with ``fields`` and no other (a typo such as
    ``{flod}``, an unclosed brace, an index or attribute)."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as e:  # a single { or }
        raise argparse.ArgumentTypeError(f"{text!r}: {e} (write {{fold}}, {{runs}})") from None
    unknown = sorted({n for n in names if n not in fields})
    if unknown:
        known = ", ".join(f"{{{f}}}" for f in fields)
        raise argparse.ArgumentTypeError(f"{text!r}: unknown field {{{unknown[0]}}} (known: {known})")
    try:
        text.format(runs="runs", fold=0)
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


# ---------------------------------------------------------------------------------------------- fold checkpoints
def add_checkpoint_options(p: argparse.ArgumentParser, fold_dir_help: str) -> None:
    """``--fold-dir`` and the four STACT-Time checkpoints that override it (``usnodule predict`` / ``export``)."""
    p.add_argument("--fold-dir", type=Path, default=None, help=fold_dir_help)
    p.add_argument("--seg", type=Path, default=None, help="SegStage checkpoint (overrides --fold-dir)")
    p.add_argument("--vit", type=Path, default=None, help="ViTStage checkpoint (overrides --fold-dir)")
    p.add_argument(
        "--maskcnn", type=Path, default=None, help="MaskCNNStage checkpoint (overrides --fold-dir)"
    )
    p.add_argument("--head", type=Path, default=None, help="HeadStage checkpoint (overrides --fold-dir)")
    p.add_argument("--head-variant", default="stact", help="head file in --fold-dir: head_<variant>.ckpt")
