"""`python -m flagd` is the `flagd` command."""

from flagd.cli import main

main()
