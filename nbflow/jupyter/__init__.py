"""The notebook surfaces: the ``%flow`` magics (``magics``, loaded by ``%load_ext nbflow``), the backend
they and the widgets share (``backend``: the local store, or a server through ``nbflow.client``) and
the ipywidgets dashboard (``widgets/``, as ``nbflow.dashboard`` and ``nbflow.watch``).

May import every layer below (``services``, ``execution``, ``core``, ``store``, the foundation), the
client and the CLI's command functions. Nothing imports it but ``nbflow/__init__.py``.
"""
