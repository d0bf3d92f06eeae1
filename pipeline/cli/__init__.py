"""The ``lesionflow`` command line: :mod:`pipeline.cli.app` (the app with every command),
:mod:`pipeline.cli.base` (consoles and what commands share) and one module per group of commands."""
