"""The SQL store: models, the engine/session handle, and migrations."""

from nbflow.store.database import Store, open_store, reset_stores, wake_runners

__all__ = ["Store", "open_store", "reset_stores", "wake_runners"]
