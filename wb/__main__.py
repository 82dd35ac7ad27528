"""`python -m wb ...`: the same as the `wb` command (the app starts its batch jobs this way)."""

from wb.cli import main

main()
