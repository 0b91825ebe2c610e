"""Running one attempt of one run: the run process (``runprocess`` -> ``execute``: papermill in a kernel),
how it is started and supervised (``launcher``, ``processes``, ``forkserver``, ``pool``), the kernels it
uses (``kernels``, ``zygote``, ``_zygote_main``), what contains it (``containment``: process groups,
cgroups, memory), where a worker's runs execute (``executors/``: ``base`` is the contract) and its
OpenTelemetry spans (``tracing``, which the API's request spans use too).

May import: ``nbflow.core``, ``nbflow.store`` and the top-level foundation. Never ``services`` or a
surface.
"""
