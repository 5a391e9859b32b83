"""`python -m volembed_runner` is the `volembed-run` command."""

from volembed_runner.cli import main

main()
