"""``python -m pipeline.cli``: the ``lesionflow`` command."""

from pipeline.cli.app import main

main()
