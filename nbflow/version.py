"""nbflow's version, in a module of its own so that any layer can name it without importing the package's
public face (``nbflow/__init__.py``, which sits above every layer)."""

__version__ = "0.1.0"
