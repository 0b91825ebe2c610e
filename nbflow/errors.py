"""Every error a user can cause has one class here, so each surface (CLI now, REST later) can map it
to one clear line and a stable code without guessing from message text."""

from __future__ import annotations


class NbflowError(Exception):
    """Base of the errors nbflow raises on purpose; ``code`` is stable and machine-readable."""

    code = "error"
    http_status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotebookError(NbflowError):
    """The notebook file is missing, unreadable or not a valid notebook."""

    code = "invalid_notebook"
    http_status = 422


class KernelNotFound(NbflowError):
    """The kernel a notebook asks for is not installed here (or it names none)."""

    code = "kernel_not_found"
    http_status = 422


class ParameterError(NbflowError):
    """A run request names an unknown parameter or a value of the wrong type."""

    code = "invalid_parameter"
    http_status = 422


class FlowNotFound(NbflowError):
    code = "flow_not_found"
    http_status = 404


class RunNotFound(NbflowError):
    code = "run_not_found"
    http_status = 404


class InvalidFlowName(NbflowError):
    code = "invalid_flow_name"
    http_status = 422


class IllegalTransition(NbflowError):
    """A state change the state machine does not allow (for example, leaving a terminal state)."""

    code = "illegal_transition"
    http_status = 409


class DatabaseError(NbflowError):
    """The database URL cannot be used (bad URL, missing driver, server unreachable)."""

    code = "database_unavailable"
    http_status = 503


class ScheduleError(NbflowError):
    """A schedule that cannot work: bad cron expression, unknown time zone, bad interval or date."""

    code = "invalid_schedule"
    http_status = 422


class InvalidLimit(NbflowError):
    """A concurrency limit or collision strategy that cannot work (a limit below 1, an unknown strategy)."""

    code = "invalid_limit"
    http_status = 422


class LimitNotFound(NbflowError):
    """Removing a tag's (or the global) concurrency limit that is not set."""

    code = "limit_not_found"
    http_status = 404


class TriggerError(NbflowError):
    """An event trigger that cannot work: a flow after itself, a dependency cycle, an unusable file glob."""

    code = "invalid_trigger"
    http_status = 422
