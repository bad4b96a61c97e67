"""The command line: ``cwkd train | eval | inspect | export | demo``, and the lines it prints for people."""

from __future__ import annotations


def main() -> None:
    """Console-script entry point (``cwkd``, ``python -m cwkd``): :func:`cwkd.cli.app.main`, imported here so
    that a Ctrl-C while the CLI loads exits quietly with 130, as one during a command does, not with a
    traceback."""
    try:
        from cwkd.cli.app import main as run
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    run()


__all__ = ["main"]
