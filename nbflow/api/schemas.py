"""Request bodies. Unknown fields are refused (``extra="forbid"``) so that a typo is an error, not a
setting silently ignored. Responses are the documented JSON documents (docs/run-json.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TriggerRequest(Body):
    parameters: dict[str, Any] = Field(default_factory=dict, description="Parameter values, by name.")
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="A repeated key returns the run the first request created (200) instead of a new run.")


class FlowSettings(Body):
    """The settings ``nbflow register`` takes; each omitted one keeps its current value."""

    retries: int | None = Field(default=None, ge=0, le=1000)
    retry_delay: float | None = Field(default=None, ge=0)
    retry_backoff: float | None = Field(default=None, ge=1)
    timeout: float | None = Field(default=None, gt=0)
    cell_timeout: float | None = Field(default=None, gt=0)
    kernel_name: str | None = Field(default=None, min_length=1, max_length=200)
    tags: list[str] | None = Field(default=None, max_length=100)
    # le: the column is a 32-bit INTEGER on PostgreSQL, so a larger number would fail in the database
    concurrency_limit: int | None = Field(default=None, ge=0, le=2**31 - 1, description="0 removes the limit.")
    collision: Literal["enqueue", "cancel-new"] | None = None
    labels: list[str] | None = Field(default=None, max_length=100,
                                     description="Worker labels its runs need; replaces the flow's labels.")


class RegisterRequest(FlowSettings):
    path: str = Field(min_length=1, max_length=4096, description="Notebook path, inside the notebooks root.")
    name: str | None = Field(default=None, min_length=1, max_length=200)


class FlowPatch(FlowSettings):
    """Only the fields sent change; ``null`` clears ``timeout``, ``cell_timeout``, ``kernel_name`` and
    ``concurrency_limit``."""

    paused: bool | None = Field(default=None, description="A paused flow's schedules and event triggers do "
                                                          "not fire; manual and API triggers still run.")


class ScheduleRequest(Body):
    flow: str = Field(min_length=1, max_length=200)
    name: str | None = Field(default=None, min_length=1, max_length=200)
    cron: str | None = Field(default=None, max_length=200)
    interval: str | float | None = Field(default=None, description="30s, 5m, 2h, 1d, or seconds.")
    at: str | None = Field(default=None, max_length=100, description="ISO 8601 date and time, for a one-off run.")
    timezone: str = Field(default="UTC", max_length=64)
    parameters: dict[str, Any] = Field(default_factory=dict)
    catch_up: Literal["skip", "latest", "all"] = "skip"
    max_lateness: float | None = Field(default=None, gt=0)


class SchedulePatch(Body):
    active: bool = Field(description="false pauses the schedule; true resumes it from now on.")


class SecretRequest(Body):
    value: str = Field(max_length=65536, description="Write-only: never returned by any route.")


class WebhookRequest(Body):
    mapping: dict[str, str] = Field(
        default_factory=dict, description="Parameter name -> field of the JSON body (dotted path) to pass as it.")


class NotificationRequest(Body):
    url: str = Field(min_length=1, max_length=2048, description="An http(s) URL, or secret:NAME.")
    on: list[Literal["FAILED", "CRASHED", "CANCELLED", "COMPLETED"]] = Field(
        default_factory=lambda: ["FAILED"], min_length=1, description="End states that send it.")
