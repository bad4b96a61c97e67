"""``python -m cwkd``."""

from cwkd.cli import main

main()
