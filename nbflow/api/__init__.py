"""nbflow's REST API: ``create_app()`` builds the FastAPI application that ``nbflow serve`` runs.

Layered as Prefect's server is: routes (``nbflow.api.routes``) translate HTTP to calls of the service
layer and contain no SQL; authentication is ``nbflow.api.auth``; every error leaves through one handler
(``nbflow.api.errors``) in one JSON shape. Two exceptions to "routes only": the two hottest successes
(a trigger, a run read) are answered by ``nbflow.api.fastpath`` with the routes' exact answer, and
triggers are written by ``nbflow.api.group_commit``. ``nbflow.api.server`` serves it (and its worker
processes). docs/api.md is the user's guide.
"""

from nbflow.api.app import create_app
from nbflow.api.schemas import API_VERSION

__all__ = ["API_VERSION", "create_app"]
