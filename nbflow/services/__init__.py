"""The long-lived loops that orchestrate runs: the ``runner`` (claims and executes), the ``scheduler``
(fires schedules, and as leader runs the housekeeping below), ``events`` (pipelines and file triggers),
``leader`` (leases for one-at-a-time roles), ``retention``, ``notify``, ``webhooks``, ``events_feed``
(the watcher that feeds the live event streams of the API and ``nbflow watch``) and ``metrics``, what
``/metrics`` reads of the store.

May import: ``nbflow.execution``, ``nbflow.core``, ``nbflow.store`` and the top-level foundation. Never
a surface (``api``, ``cli``, ``jupyter``).
"""
