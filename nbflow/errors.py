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


class InvalidSetting(NbflowError):
    """An ``NBFLOW_*`` environment variable with a value that cannot work (nbflow.settings); the message
    names the variable. A set-up problem of the server, not of a request, hence 503."""

    code = "invalid_setting"
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


class PathNotAllowed(NbflowError):
    """A notebook path from a remote caller that resolves outside the notebooks root (``..``, an absolute
    path elsewhere, a symlink out of it): refused before anything reads the file."""

    code = "path_not_allowed"
    http_status = 422


class IdempotencyConflict(NbflowError):
    """An idempotency key already used by a run of another flow or with other parameters."""

    code = "idempotency_conflict"
    http_status = 409


class InvalidQuery(NbflowError):
    """A listing's filter or cursor that cannot be understood (an unknown state, a bad time, a bad cursor)."""

    code = "invalid_query"
    http_status = 400


class ScheduleNotFound(NbflowError):
    code = "schedule_not_found"
    http_status = 404


class InvalidName(NbflowError):
    """A name for an API key or a secret that cannot be used (empty, too long, odd characters)."""

    code = "invalid_name"
    http_status = 422


class InvalidScope(NbflowError):
    """An API key scope that is not one of ``read``, ``trigger``, ``admin``."""

    code = "invalid_scope"
    http_status = 422


class KeyExists(NbflowError):
    """An API key of that name exists already (revoked keys keep their name, for the record)."""

    code = "key_exists"
    http_status = 409


class KeyNotFound(NbflowError):
    code = "key_not_found"
    http_status = 404


class SecretKeyMissing(NbflowError):
    """Secrets cannot be stored or read: ``NBFLOW_SECRET_KEY`` is not set. A set-up problem of the server,
    not of the request, hence 503."""

    code = "secret_key_missing"
    http_status = 503


class SecretKeyMismatch(NbflowError):
    """A stored secret does not decrypt with the configured ``NBFLOW_SECRET_KEY`` (another key stored it)."""

    code = "secret_key_mismatch"
    http_status = 503


class InvalidSecret(NbflowError):
    """A secret value that cannot be stored (empty, too short to redact, not text)."""

    code = "invalid_secret"
    http_status = 422


class SecretNotFound(NbflowError):
    code = "secret_not_found"
    http_status = 404


class WebhookNotFound(NbflowError):
    """An unknown or revoked webhook token or id (the two are not told apart to a caller)."""

    code = "webhook_not_found"
    http_status = 404


class InvalidWebhook(NbflowError):
    """A webhook mapping that cannot work: a parameter the flow does not declare, an empty field path."""

    code = "invalid_webhook"
    http_status = 422


class FlowPaused(NbflowError):
    """An automatic trigger (a webhook) of a paused flow: it runs again once resumed."""

    code = "flow_paused"
    http_status = 409


class InvalidNotification(NbflowError):
    """A notification that cannot work: not an http(s) URL, an end state that does not exist."""

    code = "invalid_notification"
    http_status = 422


class NotificationNotFound(NbflowError):
    code = "notification_not_found"
    http_status = 404


class InvalidRetention(NbflowError):
    """A retention age that cannot work (``--older-than``, ``NBFLOW_RETENTION_DAYS``)."""

    code = "invalid_retention"
    http_status = 422


class ExecutorUnavailable(NbflowError):
    """The executor a worker was asked for cannot be used: its package is not installed, or its cluster
    cannot be reached."""

    code = "executor_unavailable"
    http_status = 503


class InvalidLabel(NbflowError):
    """A worker label (``nbflow worker --labels``, ``nbflow register --label``) that cannot be used."""

    code = "invalid_label"
    http_status = 422


def one_line(exc: BaseException) -> str:
    """An error as one line a user can act on: an nbflow error's message, else its kind and message."""
    text = str(exc) if isinstance(exc, NbflowError) else f"{type(exc).__name__}: {exc}"
    return (text.strip().splitlines() or [type(exc).__name__])[0][:500]
