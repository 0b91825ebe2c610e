"""``python -m nbflow.cli``: the ``nbflow`` command, as the tests and the run process's fork server start it."""

from nbflow.cli import main

main()
