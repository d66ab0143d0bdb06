"""``python -m posthoc_cli`` runs the command-line tool."""

from ._entry import main

main()
