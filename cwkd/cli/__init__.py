"""The command line: ``cwkd train | eval | inspect | export | demo``, and the lines it prints for people."""

from cwkd.cli.app import main

__all__ = ["main"]
