"""The service layer: the rules of flows, runs and their states, parameters, keys, secrets, concurrency
limits, worker labels and the run counters. Every surface (CLI, REST API, magics, widgets) and every loop
calls these functions; none of them starts a process or a thread.

May import: ``nbflow.store`` and the top-level foundation (``errors``, ``checks``, ``settings``,
``record``). Never ``execution``, ``services`` or a surface.
"""
