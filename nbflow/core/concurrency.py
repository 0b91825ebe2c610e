"""Concurrency limits: global, per flow and per tag, with slots that cannot leak.

The rules
---------
* **A slot is a run's state, never a counter.** A run occupies a slot while it is ``RUNNING`` or
  ``CANCELLING``, or while a process holds it and it has not started yet: ``PENDING`` with a
  ``worker_id`` (claimed), or ``SCHEDULED`` with a ``worker_id`` (an ``AwaitingRetry`` attempt its
  worker is waiting out; that worker starts it without claiming again, so it keeps its slot). A run
  frees its slot by ending, or by being released to the queue (``worker_id`` cleared). Nothing is
  stored that could drift from the runs: the counts are taken in the claim transaction itself.
* **Three kinds of limit**, all "at most N runs occupy a slot at once, across every worker":
  a flow's ``concurrency_limit`` (``nbflow register --concurrency N``); a tag's limit (the
  ``tag_limit`` table, ``nbflow limits set TAG N``), counting the runs of every flow carrying the
  tag; the global limit (the tag ``*``, ``nbflow limits set --global N``), counting every run.
  A run is admitted only if every limit that applies to it has room.
* **Collision strategies** say what happens to a run that cannot be admitted because its *flow* is at
  its limit: ``enqueue`` (default) leaves it ``PENDING`` and unclaimed, untouched, until a slot frees;
  ``cancel-new`` ends it ``CANCELLED`` (through ``states.transition``) with a message naming the limit.
  A run held back by a tag or the global limit always waits: those limits are shared capacity, not a
  statement about the flow.
* **Blocked runs never block others.** ``admit`` walks the queue oldest first and skips what cannot
  be admitted, looking further down until it has ``limit`` runs or the queue is exhausted; later
  pages leave out flows already known to be full, so a long backlog of a saturated flow costs
  nothing.
* **The fast path stays fast.** If no candidate is touched by any limit (no flow limit, no limited
  tag, no global limit), the first page is claimed as it is: one small query for the tag limits is
  all the extra cost, never a query per run.
* **Foreground runs** (``nbflow run NOTEBOOK``) are claimed at birth by the process that runs them:
  they bypass the queue and so the limits (a user's explicit action), but while they run they occupy
  slots like any other run.

Races between workers
---------------------
On SQLite every write transaction begins with ``BEGIN IMMEDIATE``, so claims are already one at a
time. On PostgreSQL, under READ COMMITTED, two workers counting at the same moment could both see a
free slot and both take it. So, before counting, a claim that involves limits locks (waiting, not
``SKIP LOCKED``) the rows of the limits it is about to check: the limited flows that have queued runs
(``FOR NO KEY UPDATE``, which does not conflict with the key-share locks of foreign-key checks, so
inserting new runs is never held up) and the relevant ``tag_limit`` rows (``*`` included). A second
claimer waits for the first to commit, and its count, a new statement, sees the first one's claims.
Locks are always taken in one order (flows by id, then tags by name), and run rows are only ever taken
with ``SKIP LOCKED``, so claimers cannot deadlock. A limit set or changed while claims are in flight
applies from the next claim that sees it; runs already holding slots are never stopped.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, cast, column, exists, func, literal, or_, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from nbflow import checks
from nbflow.core import states
from nbflow.errors import InvalidLimit, LimitNotFound
from nbflow.store.models import Flow, Run, TagLimit

GLOBAL = "*"
ENQUEUE = "enqueue"
CANCEL_NEW = "cancel-new"
COLLISIONS = (ENQUEUE, CANCEL_NEW)
PAGE_SIZE = 100  # queued runs looked at per query once some are blocked
MAX_PAGES = 20  # per claim; whatever is left is looked at by the next claim


def labels_fit(session: Session, labels: Sequence[str]) -> ColumnElement[bool]:
    """The flows a runner with ``labels`` may run: those whose labels are all among them.

    PostgreSQL: JSONB containment (``flow.labels <@ '[...]'``). SQLite: no element of ``flow.labels``
    outside the list (``json_each``). Either way a condition evaluated per candidate row, no extra query.
    """
    if session.get_bind().dialect.name == "postgresql":
        import json

        return Flow.labels.op("<@")(cast(literal(json.dumps(sorted(labels))), JSONB))
    element = func.json_each(Flow.labels).table_valued("value")
    return ~exists(select(literal(1)).select_from(element).where(column("value").not_in(list(labels))))


def occupies_slot() -> ColumnElement[bool]:
    """The runs that hold a slot (see the module docstring)."""
    return or_(
        Run.state.in_([states.S.RUNNING, states.S.CANCELLING]),
        and_(Run.state.in_([states.S.PENDING, states.S.SCHEDULED]), Run.worker_id.is_not(None)),
    )


def _queued() -> ColumnElement[bool]:
    return and_(Run.state == states.S.PENDING, Run.worker_id.is_(None))


@dataclass(frozen=True)
class _Policy:
    """A flow's limits as one claim sees them."""

    flow_id: int
    name: str
    limit: int | None
    collision: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class _Candidate:
    id: uuid.UUID
    created_at: datetime
    policy: _Policy


_POLICY_COLUMNS = (Flow.id, Flow.name, Flow.concurrency_limit, Flow.collision, Flow.tags)


def _policy(row: Any) -> _Policy:
    return _Policy(flow_id=row[0], name=row[1], limit=row[2], collision=row[3] or ENQUEUE,
                   tags=tuple(row[4] or ()))


def _candidates(session: Session, size: int, labels: Sequence[str], after: tuple[datetime, uuid.UUID] | None = None,
                exclude: set[int] | frozenset[int] = frozenset()) -> list[_Candidate]:
    """Queued runs oldest first, of flows whose labels the worker has, with their flow's limits, locked for
    us (others skip them)."""
    query = (select(Run.id, Run.created_at, *_POLICY_COLUMNS).join(Flow, Flow.id == Run.flow_id)
             .where(_queued(), labels_fit(session, labels)))
    if after is not None:
        query = query.where(or_(Run.created_at > after[0], and_(Run.created_at == after[0], Run.id > after[1])))
    if exclude:
        query = query.where(Run.flow_id.not_in(sorted(exclude)))
    rows = session.execute(
        query.order_by(Run.created_at, Run.id).limit(size).with_for_update(skip_locked=True, of=Run)
    ).all()
    return [_Candidate(id=r[0], created_at=r[1], policy=_policy(r[2:])) for r in rows]


def _touched(policy: _Policy, tag_limits: dict[str, int]) -> bool:
    return policy.limit is not None or GLOBAL in tag_limits or any(t in tag_limits for t in policy.tags)


def admit(session: Session, limit: int, labels: Sequence[str] = ()) -> list[uuid.UUID]:
    """The queued runs a claim of up to ``limit`` runs by a worker with ``labels`` may take now, oldest first.

    Called inside the claim's write transaction, which then stamps the returned runs with the worker's
    id. Runs of ``cancel-new`` flows at their limit that it meets on the way are ended CANCELLED here.
    """
    if limit <= 0:
        return []
    tag_limits: dict[str, int] = {tag: n for tag, n in session.execute(select(TagLimit.tag, TagLimit.limit))}
    page = _candidates(session, limit, labels)
    if not any(_touched(c.policy, tag_limits) for c in page):
        return [c.id for c in page]  # the fast path: no limit applies to any of them
    return _admit_under_limits(session, limit, tag_limits, page, labels)


def _admit_under_limits(session: Session, limit: int, tag_limits: dict[str, int],
                        page: list[_Candidate], labels: Sequence[str]) -> list[uuid.UUID]:
    # Every flow with queued runs, so that the locks below are all taken now, in one order.
    policies = {p.flow_id: p for p in map(_policy, session.execute(
        select(*_POLICY_COLUMNS).where(Flow.id.in_(select(Run.flow_id).where(_queued())))))}
    locked_flows = sorted(fid for fid, p in policies.items() if p.limit is not None)
    if locked_flows:  # serialise the claims of these flows (PostgreSQL; SQLite is serialised already)
        for row in session.execute(select(*_POLICY_COLUMNS).where(Flow.id.in_(locked_flows)).order_by(Flow.id)
                                   .with_for_update(key_share=True)):
            policies[row[0]] = _policy(row)  # as of the lock: a change committed meanwhile is seen
    known_tags = set(tag_limits)
    locked_tags = sorted({GLOBAL, *(t for p in policies.values() for t in p.tags)} & known_tags)
    tag_limits = {}
    if locked_tags:
        tag_limits = {tag: n for tag, n in session.execute(
            select(TagLimit.tag, TagLimit.limit).where(TagLimit.tag.in_(locked_tags)).order_by(TagLimit.tag)
            .with_for_update())}
    usage = _Usage.count(session, tag_limits)

    def covered(cand: _Candidate) -> bool:
        """Whether every limit on this run is one we locked. Not so only for a run whose flow got its
        first queued run, a limit or a limited tag after we looked: the next claim takes care of it."""
        fresh = cand.policy
        return (fresh.flow_id in policies
                and (fresh.limit is None or fresh.flow_id in locked_flows)
                and known_tags.intersection(fresh.tags).issubset(locked_tags))

    admitted: list[uuid.UUID] = []
    blocked: set[int] = set()  # flows none of whose queued runs this claim can admit

    def block_full() -> None:
        full_tags = {t for t, n in tag_limits.items() if t != GLOBAL and usage.tags.get(t, 0) >= n}
        for p in policies.values():
            flow_full = p.limit is not None and usage.flows.get(p.flow_id, 0) >= p.limit
            if (flow_full and p.collision != CANCEL_NEW) or full_tags.intersection(p.tags):
                blocked.add(p.flow_id)

    block_full()
    asked = limit
    for _ in range(MAX_PAGES):
        for cand in page:
            if cand.policy.flow_id in blocked or not covered(cand):
                continue
            policy = policies[cand.policy.flow_id]
            verdict = usage.verdict(policy, tag_limits)
            if verdict is None:
                usage.take(policy)
                admitted.append(cand.id)
                if len(admitted) >= limit:
                    return admitted
                block_full()
            elif verdict == "global":
                return admitted  # no run at all can be admitted now
            elif verdict == "flow" and policy.collision == CANCEL_NEW:
                run = states.lock_run(session, cand.id)
                states.transition(session, run, states.S.CANCELLED, message=(
                    f"flow {policy.name!r} is at its concurrency limit of {policy.limit} "
                    f"(collision strategy {CANCEL_NEW})"))
            else:
                blocked.add(policy.flow_id)
        if len(page) < asked:  # that was the end of the queue
            return admitted
        asked = max(limit, PAGE_SIZE)
        page = _candidates(session, asked, labels, after=(page[-1].created_at, page[-1].id), exclude=blocked)
    return admitted


@dataclass
class _Usage:
    """Slots in use, counted in the claim transaction, then updated as the claim admits runs."""

    flows: dict[int, int]
    tags: dict[str, int]
    total: int

    @classmethod
    def count(cls, session: Session, tag_limits: dict[str, int]) -> _Usage:
        by_flow, by_tag, total = slots_in_use(session, with_tags=any(t != GLOBAL for t in tag_limits))
        return cls(flows=by_flow, tags=by_tag, total=total)

    def verdict(self, policy: _Policy, tag_limits: dict[str, int]) -> str | None:
        """Which limit keeps a run of this flow out (``flow``, ``global`` or ``tag``), or None."""
        if policy.limit is not None and self.flows.get(policy.flow_id, 0) >= policy.limit:
            return "flow"
        if GLOBAL in tag_limits and self.total >= tag_limits[GLOBAL]:
            return "global"
        if any(t in tag_limits and self.tags.get(t, 0) >= tag_limits[t] for t in policy.tags):
            return "tag"
        return None

    def take(self, policy: _Policy) -> None:
        self.flows[policy.flow_id] = self.flows.get(policy.flow_id, 0) + 1
        for tag in set(policy.tags):
            self.tags[tag] = self.tags.get(tag, 0) + 1
        self.total += 1


# -- managing limits (the service the CLI, and later the REST API, call) --------------------------------

def check_limit(value: int, what: str, hint: str = "") -> int:
    """A limit is a whole number of runs, at least 1: a limit of 0 would hold every run back for good,
    which is never what anyone means (pausing is another feature)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidLimit(f"{what} must be a whole number of runs, at least 1{hint}; got {value!r}")
    if value > checks.MAX_CONCURRENCY:  # and a 32-bit column on PostgreSQL
        raise InvalidLimit(f"{what} must be at most {checks.MAX_CONCURRENCY:,} runs; got {value!r}")
    return value


def check_collision(value: str) -> str:
    if value not in COLLISIONS:
        raise InvalidLimit(f"collision strategy must be {ENQUEUE!r} or {CANCEL_NEW!r}; got {value!r}")
    return value


def _check_tag(tag: str) -> str:
    if (not isinstance(tag, str) or not tag.strip() or tag != tag.strip() or len(tag) > checks.MAX_NAME_LENGTH
            or checks.text_problem(tag) is not None):  # a NUL, or not valid Unicode: never stored
        raise InvalidLimit(f"invalid tag {tag!r}: a non-empty name without surrounding spaces, at most 200 "
                           "characters (use --global for the limit on all runs)")
    return tag


def set_tag_limit(session: Session, tag: str, limit: int) -> TagLimit:
    """Create or change the limit of ``tag`` (``*``: the global limit). Applies from the next claim."""
    _check_tag(tag)
    check_limit(limit, "the global limit" if tag == GLOBAL else f"the limit of tag {tag!r}")
    row = session.execute(select(TagLimit).where(TagLimit.tag == tag).with_for_update()).scalar_one_or_none()
    if row is None:
        row = TagLimit(tag=tag, limit=limit)
        session.add(row)
    else:
        row.limit = limit
    session.flush()
    return row


def remove_tag_limit(session: Session, tag: str) -> None:
    """Delete the limit of ``tag`` (``*``: the global limit), or raise ``LimitNotFound``."""
    row = session.get(TagLimit, tag)
    if row is None:
        known = [t for t in session.execute(select(TagLimit.tag).order_by(TagLimit.tag)).scalars()]
        what = "no global concurrency limit is set" if tag == GLOBAL else f"no concurrency limit on tag {tag!r}"
        listing = ", ".join("--global" if t == GLOBAL else t for t in known)
        raise LimitNotFound(what + (f"; limits are set on: {listing}" if listing else "; no limits are set"))
    session.delete(row)


def slots_in_use(session: Session, *, with_tags: bool = True) -> tuple[dict[int, int], dict[str, int], int]:
    """Slots held right now: per flow id, per tag (every tag of the holding runs' flows) and in all.

    The runs holding slots are few (at most the workers' slots plus foreground runs), so the tags are
    summed here rather than by a JSON query that would differ between SQLite and PostgreSQL.
    """
    by_flow = {fid: n for fid, n in session.execute(
        select(Run.flow_id, func.count()).where(occupies_slot()).group_by(Run.flow_id))}
    by_tag: dict[str, int] = {}
    if by_flow and with_tags:
        for fid, tags in session.execute(select(Flow.id, Flow.tags).where(Flow.id.in_(sorted(by_flow)))):
            for tag in set(tags or ()):
                by_tag[tag] = by_tag.get(tag, 0) + by_flow[fid]
    return by_flow, by_tag, sum(by_flow.values())


def list_limits(session: Session) -> list[dict[str, Any]]:
    """Every limit in force, with the slots it has in use: the global one, per tag, per flow."""
    by_flow, by_tag, total = slots_in_use(session)
    docs: list[dict[str, Any]] = []
    for row in session.execute(select(TagLimit).order_by(TagLimit.tag)).scalars():
        is_global = row.tag == GLOBAL
        docs.append({"scope": "global" if is_global else "tag", "name": row.tag, "limit": row.limit,
                     "in_use": total if is_global else by_tag.get(row.tag, 0), "collision": ENQUEUE})
    docs.sort(key=lambda d: d["scope"] != "global")  # the global limit first, then tags by name
    for flow in session.execute(select(Flow).where(Flow.concurrency_limit.is_not(None)).order_by(Flow.name)).scalars():
        docs.append({"scope": "flow", "name": flow.name, "limit": flow.concurrency_limit,
                     "in_use": by_flow.get(flow.id, 0), "collision": flow.collision or ENQUEUE})
    return docs
