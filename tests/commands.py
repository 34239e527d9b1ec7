"""Command lines for the CLI tests, written as calls rather than one string per line."""

from __future__ import annotations


def argv(command: str, *positional, **options) -> list[str]:
    """``argv("baselines", h5, n_estimators=3)`` -> ``["baselines", "<h5>", "--n-estimators", "3"]``: every
    value through ``str``, option names with ``_`` -> ``-``, in the order given."""
    out = [command, *map(str, positional)]
    for name, value in options.items():
        out += [f"--{name.replace('_', '-')}", str(value)]
    return out
