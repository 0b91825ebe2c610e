"""``python -m nbflow``: the ``nbflow`` command, for an environment whose scripts folder is not on PATH."""

from nbflow.cli import main

main()
