"""Small helpers shared by tests: build real notebooks on disk."""

from __future__ import annotations

from pathlib import Path

import nbformat


def make_notebook(
    directory: Path, name: str, cells: list[str], *, parameters: str | None = None,
    kernel: str | None = "python3",
) -> Path:
    """Write ``name``.ipynb: an optional ``parameters``-tagged cell first, then the code cells."""
    nb = nbformat.v4.new_notebook()
    if kernel is not None:
        nb.metadata.kernelspec = {"name": kernel, "display_name": kernel, "language": "python"}
    nb.metadata.language_info = {"name": "python"}
    if parameters is not None:
        cell = nbformat.v4.new_code_cell(parameters)
        cell.metadata.tags = ["parameters"]
        nb.cells.append(cell)
    nb.cells.extend(nbformat.v4.new_code_cell(src) for src in cells)
    path = directory / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path
