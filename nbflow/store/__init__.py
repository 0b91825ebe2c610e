"""The SQL store: the models, the engine/session handle (``database``), riding out database outages
(``retry``) and the schema's Alembic migrations (``migrations/``).

May import only the top-level foundation (``errors``, ``checks``, ``settings``): every other layer
stands on it.
"""

from nbflow.store.database import Store, open_store, reset_stores, wake_runners

__all__ = ["Store", "open_store", "reset_stores", "wake_runners"]
