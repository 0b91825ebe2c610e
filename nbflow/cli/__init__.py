"""The ``nbflow`` command line.

Scripts and agents are first-class users: every listing command takes ``--json`` and then prints one
JSON document on stdout and nothing else. Exit codes: 0 success (a run COMPLETED), 1 a run ended in any
other state (or nbflow hit an internal error), 2 bad input or a bad environment (one line
``nbflow: error: ...`` on stderr; nothing was written), 130 interrupted (Ctrl-C).

The contract holds whatever goes wrong: the root group (``_Cli.main``) turns every exception that
reaches it into that one line: click's usage errors, nbflow's own errors, an unusable database (corrupt
file, read-only, full disk, server gone), a bad ``NBFLOW_*`` value, and, for a bug, one
``internal error`` line (exit 1; ``NBFLOW_DEBUG=1`` prints the traceback too).

The commands live by topic, one module each (``runs``, ``flows``, ``schedules``, ``workers``, ``limits``,
``db``, ``keys``, ``hooks``), all on the root group ``cli`` of ``common``, which also holds what they
share (the error contract, option types, output). Importing this package registers every command; each
command imports the layers it needs (``core``, ``services``, ``api``) when it runs, so ``nbflow --help``
stays fast.
"""

from __future__ import annotations

from nbflow.cli import db, flows, hooks, keys, limits, mcp, runs, schedules, watch, workers  # noqa: F401  (registers the commands)
from nbflow.cli.common import cli

__all__ = ["cli", "main"]


def main() -> None:
    """The ``nbflow`` command (``[project.scripts]``, ``python -m nbflow.cli``)."""
    from nbflow.execution.startup import skip_unused_imports

    skip_unused_imports()
    cli(prog_name="nbflow")
