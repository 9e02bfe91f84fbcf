"""`python -m ziplm_planner` runs the CLI."""

from .cli import main

main()
