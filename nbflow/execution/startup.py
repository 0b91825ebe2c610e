"""Done by nbflow's own processes (the ``nbflow`` command, the runner's fork server, a foreground run
process), never on ``import nbflow``: a library must not change what its importer's imports do.

jsonschema, which nbformat imports to validate notebooks, compiles a grammar for the ``iri`` string format
at import when ``rfc3987_syntax`` is installed (jupyter-server's dependencies bring it): ~1 s of CPU,
measured at 1.19 s vs 0.19 s for nbformat's first validation here, on every command and every worker
start, for a format nbformat's schema never uses. Marked absent, jsonschema skips that one check.
"""

from __future__ import annotations

import gc
import sys


def skip_unused_imports() -> None:
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]


def freeze_startup_objects() -> None:
    """Put everything a long-lived process has built by now (modules, classes, its app) out of the cyclic
    garbage collector's reach, once it is up.

    A process with Jupyter's libraries imported holds ~250,000 objects, and every full collection walked
    them all: ~150 ms with the process stalled, about once a second under API load, which was the
    whole of the API's p99 and ~15% of its CPU. Frozen, a full collection walks only what requests
    allocate (~10 ms). These objects live as long as the process anyway; garbage from start-up is
    collected first.
    """
    gc.collect()
    gc.freeze()
