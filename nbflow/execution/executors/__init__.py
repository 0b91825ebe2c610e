"""Executors: where a worker's claimed runs execute (``base`` is the contract; ``local``, ``dask``)."""

from nbflow.execution.executors.base import Executor

__all__ = ["Executor"]
