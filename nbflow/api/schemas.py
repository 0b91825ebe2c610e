"""Request bodies and response documents.

Unknown request fields are refused (``extra="forbid"``) so that a typo is an error, not a setting silently
ignored. Responses are the documented JSON documents (docs/run-json.md), typed so that the OpenAPI document
describes every field; unknown response fields are allowed, as newer servers add fields."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, WithJsonSchema

from nbflow import checks
from nbflow.checks import MAX_MEMORY_LIMIT, MIN_MEMORY_LIMIT
from nbflow.core.states import StateType
from nbflow.errors import NbflowError
from nbflow.services.webhooks import SEGMENT_CHARS

# The REST API's version (``GET /api/health``); a client refuses a server of another major version.
API_VERSION = "1.1"


class Refused(ValueError):
    """A field the service's own check refused, inside request validation: the API answers with that
    check's error (its code and message, as every other door gives them), not a generic ``invalid_request``
    (``nbflow.api.errors``)."""

    def __init__(self, error: NbflowError) -> None:
        super().__init__(error.message)
        self.error = error


def checked(check: Callable[[Any], Any]) -> AfterValidator:
    def validate(value: Any) -> Any:
        try:
            check(value)
        except NbflowError as exc:
            raise Refused(exc) from None
        return value

    return AfterValidator(validate)


def _not_null(value: Any, info: ValidationInfo) -> Any:
    if value is None:
        from nbflow.errors import NotebookError

        raise Refused(NotebookError(f"flow setting {info.field_name} cannot be null"))
    return value


# A setting that may be left out (None: keep the value) but not sent as null: the document says so (the type
# is not nullable), and the service's message says which setting cannot be cleared.
NotNull = BeforeValidator(_not_null)


def _check_key_name(value: str) -> None:
    from nbflow.core.keys import check_name

    check_name(value)


def _check_flow_name(value: str) -> None:
    from nbflow.core.flows import check_name

    check_name(value)

# The bounds of nbflow.checks, as the OpenAPI document states them: schemathesis (tests/test_api_fuzz.py)
# checks that the server accepts what these allow and refuses what they do not.
Seconds = Annotated[float, Field(ge=0, le=checks.MAX_SECONDS, allow_inf_nan=False)]
PositiveSeconds = Annotated[float, Field(gt=0, le=checks.MAX_SECONDS, allow_inf_nan=False)]
# Text without NUL (PostgreSQL refuses it; a lone surrogate is refused by pydantic's ``str`` itself).
NO_NUL = r"^[^\x00]*$"
ShortText = Annotated[str, Field(min_length=1, max_length=checks.MAX_NAME_LENGTH, pattern=NO_NUL)]
# A name's rules are stated in the document and checked by the service's own check, for its message.
_NAME_SCHEMA = WithJsonSchema({"type": "string", "minLength": 1, "maxLength": checks.MAX_NAME_LENGTH,
                               "pattern": checks.NAME_PATTERN})
FlowName = Annotated[str, Field(min_length=1), _NAME_SCHEMA, checked(_check_flow_name)]
KeyName = Annotated[str, Field(min_length=1), _NAME_SCHEMA, checked(_check_key_name)]
# A tag: non-empty, no surrounding white space (``flows.check_tags``).
Tag = Annotated[str, Field(min_length=1, max_length=checks.MAX_NAME_LENGTH,
                           pattern=r"^[^\s\x00](?:[^\x00]*[^\s\x00])?$")]
Label = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")]
# Parameter values are checked by the service (``nbflow.core.parameters``), as from every other door, so the
# message is the same everywhere; the names' bounds are stated here too.
Parameters = Annotated[dict[str, Any], WithJsonSchema({
    "type": "object", "propertyNames": {"maxLength": checks.MAX_NAME_LENGTH, "pattern": NO_NUL}})]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TriggerRequest(Body):
    parameters: Parameters = Field(default_factory=dict, description="Parameter values, by name.")
    idempotency_key: ShortText | None = Field(
        default=None,
        description="A repeated key returns the run the first request created (200) instead of a new run.")


class FlowSettings(Body):
    """The settings ``nbflow register`` takes; each omitted one keeps its current value."""

    retries: Annotated[int, Field(ge=0, le=checks.MAX_RETRIES), NotNull] = Field(default=None)
    retry_delay: Annotated[Seconds, NotNull] = Field(default=None, description="Seconds before the first retry.")
    retry_backoff: Annotated[float, Field(ge=1, le=checks.MAX_BACKOFF, allow_inf_nan=False), NotNull] = Field(
        default=None, description="Multiplier of the delay for each further retry.")
    timeout: PositiveSeconds | None = Field(default=None, description="Whole-run timeout in seconds.")
    cell_timeout: PositiveSeconds | None = Field(default=None, description="Per-cell timeout in seconds.")
    kernel_name: ShortText | None = None
    tags: Annotated[list[Tag], Field(max_length=checks.MAX_ITEMS), NotNull] = Field(default=None)
    concurrency_limit: Annotated[int, Field(ge=0, le=checks.MAX_CONCURRENCY)] | None = Field(
        default=None, description="0 removes the limit.")
    collision: Annotated[Literal["enqueue", "cancel-new"], NotNull] = Field(default=None)
    labels: Annotated[list[Label], Field(max_length=checks.MAX_ITEMS), NotNull] = Field(
        default=None, description="Worker labels its runs need; replaces the flow's labels.")
    memory_limit: Annotated[int, Field(ge=MIN_MEMORY_LIMIT, le=MAX_MEMORY_LIMIT)] | None = Field(
        default=None, description="Bytes the run's kernel may use, where the worker has cgroups "
                                  "(docs/operations.md); null in a PATCH removes the limit.")


class RegisterRequest(FlowSettings):
    path: str = Field(min_length=1, max_length=checks.MAX_PATH_LENGTH,
                      description="Notebook path, inside the notebooks root.")
    name: FlowName | None = Field(default=None, description="Default: from the file name.")


class FlowPatch(FlowSettings):
    """Only the fields sent change; ``null`` clears ``timeout``, ``cell_timeout``, ``kernel_name``,
    ``concurrency_limit`` and ``memory_limit``."""

    paused: Annotated[bool, NotNull] = Field(
        default=None, description="A paused flow's schedules and event triggers do not fire; manual and API "
                                  "triggers still run.")


class ScheduleRequest(Body):
    flow: ShortText
    name: ShortText | None = None
    cron: Annotated[str, Field(max_length=checks.MAX_NAME_LENGTH, pattern=NO_NUL)] | None = None
    interval: Annotated[str, Field(max_length=100, pattern=NO_NUL)] | PositiveSeconds | None = Field(
        default=None, description="30s, 5m, 2h, 1d, or seconds.")
    at: Annotated[str, Field(max_length=100, pattern=NO_NUL)] | None = Field(
        default=None, description="ISO 8601 date and time, for a one-off run.")
    timezone: Annotated[str, Field(max_length=64, pattern=NO_NUL)] = "UTC"
    parameters: Parameters = Field(default_factory=dict)
    catch_up: Literal["skip", "latest", "all"] = "skip"
    max_lateness: PositiveSeconds | None = None


class SchedulePatch(Body):
    active: bool = Field(description="false pauses the schedule; true resumes it from now on.")


class SecretRequest(Body):
    value: str = Field(min_length=4, max_length=65536, pattern=NO_NUL,
                       description="Write-only: never returned by any route. At least 4 characters.")


# A webhook maps a parameter (a Python identifier) to a dotted path of the body's fields.
MAPPING_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
FIELD_PATH = rf"^{SEGMENT_CHARS}+(\.{SEGMENT_CHARS}+)*$"
MappingName = Annotated[str, Field(max_length=checks.MAX_NAME_LENGTH, pattern=MAPPING_NAME)]
FieldPath = Annotated[str, Field(max_length=checks.MAX_PATH_LENGTH, pattern=FIELD_PATH)]
Mapping = Annotated[dict[MappingName, FieldPath], Field(max_length=checks.MAX_ITEMS), WithJsonSchema({
    "type": "object", "maxProperties": checks.MAX_ITEMS,
    "propertyNames": {"maxLength": checks.MAX_NAME_LENGTH, "pattern": MAPPING_NAME},
    "additionalProperties": {"type": "string", "maxLength": checks.MAX_PATH_LENGTH, "pattern": FIELD_PATH}})]


class WebhookRequest(Body):
    mapping: Mapping = Field(
        default_factory=dict, description="Parameter name -> field of the JSON body (dotted path) to pass as it.")


# What ``nbflow.services.notify`` accepts, stated loosely enough to be exact for what clients send: an http(s) URL
# with a host name (letters, digits, '.', '-', an optional port), or secret:NAME.
PORT = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
URL_PATTERN = (r"^(?:https?://[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::" + PORT + r")?(?:[/?#][^\s\x00]*)?"
               r"|secret:[A-Za-z_][A-Za-z0-9_.-]{0,199})$")


class NotificationRequest(Body):
    url: str = Field(min_length=1, max_length=checks.MAX_URL_LENGTH, pattern=URL_PATTERN,
                     description="An http(s) URL, or secret:NAME (a stored secret holding the URL).")
    on: list[Literal["FAILED", "CRASHED", "CANCELLED", "COMPLETED"]] = Field(
        default_factory=lambda: ["FAILED"], min_length=1, description="End states that send it.")


class KeyRequest(Body):
    name: KeyName = Field(description="Letters, digits, '.', '_' or '-', starting with a letter or digit. Names "
                       "stay taken after a key is revoked.")
    scope: Literal["read", "trigger", "admin"] = Field(
        description="What the key may do; each scope includes the ones before it.")


# -- responses --------------------------------------------------------------------------------------
# The documents the routes answer, declared so that /api/openapi.json tells clients (and the schema fuzz
# test, which checks every body against them) what each field is. They describe the dicts the service
# layer builds (nbflow.core.runs, nbflow.core.flows, ...), which stay the source of truth: a field is nullable here
# wherever that code can put a null. Unknown fields are allowed (``extra="allow"``): a newer server may
# add fields (docs/run-json.md), and a client validating with these models must not refuse them.

# Times are ISO 8601 strings in UTC with an explicit offset, as the service layer formats them. Kept as
# strings (not ``datetime``) so that validating a response does not re-format them (pydantic writes "Z").
Time = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]


class Document(BaseModel):
    model_config = ConfigDict(extra="allow")


class RunError(Document):
    """The error of the latest failed attempt. Each field is null when nbflow did not learn it (a timeout
    has no ``evalue``, a crash no cell)."""

    ename: str | None = Field(description="Exception class name, or what nbflow saw: CellTimeoutError, "
                              "TimedOut, Crashed, DeadKernelError.")
    evalue: str | None = Field(description="Exception message.")
    cell_index: int | None = Field(description="Index of the failing cell in the executed notebook.")
    cell_id: str | None = Field(description="nbformat id of that cell.")
    traceback: list[str] | None = Field(description="As the kernel reported it (with ANSI colour codes).")


class CellDocument(Document):
    index: int = Field(description="Cell index in the executed notebook (injected parameters cell included).")
    cell_id: str | None = Field(description="nbformat cell id.")
    state: str = Field(description="PENDING, RUNNING, COMPLETED, FAILED, or SKIPPED (never ran).")
    started_at: Time | None
    ended_at: Time | None
    duration: float | None = Field(description="Seconds the cell took.")
    execution_count: int | None = Field(description="The kernel's execution count, as in the output notebook.")


class RunSummary(Document):
    """A run as pages of runs list it: the run document without ``cells`` (docs/run-json.md)."""

    id: str = Field(description="The run's UUID; routes accept any unique prefix of it.")
    flow: str | None = Field(description="Name of the flow.")
    flow_version: int | None = Field(description="The flow version (notebook snapshot) this run executes.")
    state: StateType = Field(description="State type: program against this.")
    state_name: str = Field(description="Human name of the state, e.g. Late, AwaitingRetry, TimedOut.")
    state_message: str | None = Field(description="Why the run is in its state.")
    parameters: dict[str, Any] = Field(description="Parameter values, converted to the parameters' types.")
    attempt: int = Field(ge=1, description="The current (or last) attempt, from 1.")
    max_attempts: int = Field(ge=1, description="The flow's retries + 1 when the run was created.")
    trigger: str = Field(description="What created the run: manual, schedule, api, event or retry.")
    parent_run_id: str | None = Field(description="The run this one retries, or the upstream run of a pipeline.")
    kernel_name: str = Field(description="The kernel the run executes with.")
    created_at: Time
    started_at: Time | None = Field(description="When the latest attempt started RUNNING.")
    ended_at: Time | None = Field(description="When the run reached a terminal state.")
    duration: float | None = Field(description="ended_at - started_at of the latest attempt, in seconds.")
    output_path: str | None = Field(description="Where the executed notebook is written.")
    error: RunError | None = Field(description="The error of the latest failed attempt; null once completed.")
    result: dict[str, Any] = Field(description="Values the notebook recorded with nbflow.record, by name.")


class RunDocument(RunSummary):
    """One run with the code cells of its latest attempt (docs/run-json.md)."""

    cells: list[CellDocument] = Field(description="Code cells of the latest attempt; [] before it started.")


class StateChange(Document):
    from_: StateType | None = Field(alias="from", description="The state before; null for the first one.")
    to: StateType
    name: str = Field(description="Human name of the new state.")
    attempt: int
    at: Time
    message: str | None


class RunWithHistory(RunDocument):
    history: list[StateChange] = Field(description="Every state transition of the run, oldest first.")


class RunPage(Document):
    runs: list[RunSummary] = Field(description="Newest first.")
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null on the last page.")


class RunCountAnswer(Document):
    count: int = Field(description="Runs matching the filters (exact, from counters the database keeps).")
    flow: str | None = Field(description="The flow filter, or null for all flows.")
    state: StateType | None = Field(description="The state filter, or null for all states.")


class RunCells(Document):
    run_id: str
    attempt: int = Field(description="The attempt the cells belong to (the latest).")
    cells: list[CellDocument]


class LogLine(Document):
    id: int = Field(description="Increasing: pass the last one seen as ?after= to get only newer lines.")
    at: Time
    stream: str = Field(description="stdout, stderr, or nbflow's own lines.")
    attempt: int
    cell_index: int | None = Field(description="The cell that wrote it; null outside cells.")
    text: str


class RunLogs(Document):
    run_id: str
    state: StateType
    logs: list[LogLine] = Field(description="Oldest first.")
    next_after: str | None = Field(description="Pass as ?after= to tail; the request's after when no line came.")


class RunResult(Document):
    run_id: str
    state: StateType
    result: dict[str, Any] = Field(description="Values recorded with nbflow.record, by name; {} if none.")


class ParameterSpec(Document):
    type: str | None = Field(description="str, int, float, bool, list, dict or any.")
    default: Any = Field(description="The default in the notebook's parameters cell.")
    help: str | None = Field(description="The comment after the default.")


class Upstream(Document):
    flow: str
    on: str = Field(description="completed (only after a completed run) or any.")


class FileTriggerDocument(Document):
    pattern: str = Field(description="Absolute glob of the files that trigger a run.")
    parameter: str = Field(description="Parameter given the file's path.")
    active: bool


class LastRun(Document):
    id: str
    state: StateType
    state_name: str
    created_at: Time


class FlowDocument(Document):
    """A flow: its settings, its latest version's parameters and its newest run (docs/run-json.md)."""

    name: str
    version: int | None = Field(description="The latest version.")
    kind: str = Field(description="notebook, or cell (a %%flow cell).")
    source_path: str | None = Field(description="Absolute path of the notebook the flow was registered from.")
    kernel_name: str | None = Field(description="null: the notebook's kernelspec.")
    tags: list[str]
    retries: int = Field(ge=0)
    retry_delay: float = Field(description="Seconds before the first retry.")
    retry_backoff: float = Field(description="Multiplier of the delay for each further retry.")
    timeout: float | None = Field(description="Whole-run timeout in seconds.")
    cell_timeout: float | None = Field(description="Per-cell timeout in seconds.")
    concurrency_limit: int | None = Field(description="At most this many runs of the flow at once.")
    collision: str = Field(description="At the limit, a new run waits (enqueue) or is cancelled (cancel-new).")
    paused: bool = Field(description="A paused flow's schedules and event triggers do not fire.")
    labels: list[str] = Field(description="Worker labels its runs need; [] for any worker.")
    memory_limit: int | None = Field(default=None, description="Bytes the run's kernel may use; null: no limit.")
    parameters: dict[str, ParameterSpec] = Field(description="Parameters of the latest version, by name.")
    after: list[Upstream] = Field(description="Flows this one runs after.")
    file_triggers: list[FileTriggerDocument]
    last_run: LastRun | None = Field(description="The newest run; null if none.")


class FlowList(Document):
    flows: list[FlowDocument] = Field(description="By name.")


class ScheduleDocument(Document):
    id: int
    flow: str
    name: str
    trigger: str = Field(description="cron, interval or date (a one-off).")
    spec: dict[str, Any] = Field(description="The trigger's definition, e.g. {\"expr\": \"0 6 * * *\"}.")
    description: str = Field(description="The definition in words, e.g. every 3600s.")
    timezone: str
    parameters: dict[str, Any]
    active: bool = Field(description="false while paused.")
    catch_up: str = Field(description="skip, latest or all: which missed slots run after downtime.")
    max_lateness: float | None = Field(description="Seconds after which a missed slot is dropped.")
    next_fire_at: Time | None = Field(description="The next slot; null when nothing is left to fire.")
    error: str | None = Field(default=None, description="Why the scheduler could not fire it (it is then paused "
                                                        "if its definition is unusable); adding it again clears it.")


class ScheduleList(Document):
    schedules: list[ScheduleDocument]


class WebhookDocument(Document):
    id: int
    flow: str
    mapping: dict[str, str] = Field(description="Parameter name -> dotted path of the JSON body field.")
    created_at: Time
    revoked_at: Time | None


class NewWebhook(WebhookDocument):
    token: str = Field(description="The webhook's secret: shown in this answer only, only a hash is stored.")
    path: str = Field(description="Where to POST: /api/hooks/{token}.")


class WebhookList(Document):
    webhooks: list[WebhookDocument] = Field(description="Revoked ones too; never their tokens.")


class NotificationDocument(Document):
    id: int
    flow: str
    url: str = Field(description="An http(s) URL, or secret:NAME.")
    on: list[str] = Field(description="End states that send it.")
    active: bool
    created_at: Time


class NotificationList(Document):
    notifications: list[NotificationDocument]


class SecretInfo(Document):
    name: str
    created_at: Time | None
    updated_at: Time | None


class SecretList(Document):
    secrets: list[SecretInfo] = Field(description="Names and times; values are write-only.")


class KeyDocument(Document):
    name: str
    scope: Literal["read", "trigger", "admin"]
    created_at: Time
    revoked_at: Time | None = Field(description="null while the key works.")


class NewKey(KeyDocument):
    key: str = Field(description="The key itself, to send as 'Authorization: Bearer KEY': shown in this answer "
                     "only (the server keeps a hash).")


class KeyList(Document):
    keys: list[KeyDocument] = Field(description="Active and revoked, by name; never a key or its hash.")


class DatabaseHealth(Document):
    reachable: bool
    dialect: str = Field(description="sqlite or postgresql.")
    schema_revision: str | None = Field(description="The migration the database is at; null if unreachable.")


class SchedulerHealth(Document):
    running: bool


class RunnerHealth(Document):
    running: bool
    worker_id: str | None


class ApiProcesses(Document):
    pid: int = Field(description="The process that answered: with several API workers, each has its own.")
    workers: int = Field(description="How many processes serve the API on this port (`--api-workers`).")


class Health(Document):
    status: Literal["ok", "degraded"] = Field(description="degraded: the database cannot be reached.")
    version: str = Field(description="nbflow's version.")
    api_version: str = Field(description="A client refuses a server of another major version.")
    database: DatabaseHealth
    scheduler: SchedulerHealth
    runner: RunnerHealth
    api: ApiProcesses
