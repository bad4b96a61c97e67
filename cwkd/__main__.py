"""``python -m cwkd``."""

from cwkd.cli.app import main

main()
