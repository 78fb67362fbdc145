"""`python -m m3w ...`: the `m3w` command."""

from m3w.cli import main

main()
