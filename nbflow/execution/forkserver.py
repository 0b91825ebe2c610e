"""Imported by the runner's fork server only (``nbflow.execution.processes.PRELOAD``): fills the caches every run
process would otherwise fill for itself, once, to be shared by every process it forks.

A run's CPU bounds how many runs a machine finishes per minute, and ~60 ms of each run process went to
two process-wide one-time costs: jupyter_client's kernelspec lookup imports IPython (for its profile
folder), and nbformat compiles its JSON-schema validator on first use. Nothing here depends on a run,
a store or the folder: only imports and compiled code.
"""

from __future__ import annotations

from nbflow.execution.startup import skip_unused_imports

skip_unused_imports()  # before nbformat (below, or in the modules preloaded after this one)

import IPython.paths  # noqa: E402,F401 - imported by jupyter_client's KernelSpecManager on every lookup
import nbformat  # noqa: E402

# Validate once (read + write, as papermill does) so the validator for the current format is compiled.
nbformat.reads(nbformat.writes(nbformat.v4.new_notebook()), as_version=4)
