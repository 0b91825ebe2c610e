"""nbflow: Jupyter notebooks as parameterized, versioned, scheduled production workflows.

Importing ``nbflow`` must stay cheap: every notebook that calls ``nbflow.record`` imports it inside a
kernel, so nothing heavy (SQLAlchemy, papermill) is imported here.
"""

from nbflow.record import record

__version__ = "0.1.0"
__all__ = ["__version__", "record"]
