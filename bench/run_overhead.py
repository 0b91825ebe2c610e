"""How much does nbflow add on top of bare papermill for one tiny notebook?

Runs four variants side by side, interleaved, on the same generated 2-cell notebook:

  papermill-api   papermill.execute_notebook(...) in this process
  papermill-cli   ``papermill in.ipynb out.ipynb -p x 2 --no-progress-bar`` as a subprocess
  nbflow-api      nbflow.core.runs.create_run + nbflow.execution.launcher.execute_run in this process (the run itself
                  happens in the run process that execute_run spawns, as it always does)
  nbflow-cli      ``nbflow run in.ipynb -p x 2 --no-progress`` as a subprocess

and prints median / p90 / min wall time of each, the ratios nbflow/papermill, and where an nbflow run's
time goes according to the timestamps nbflow itself stores. It measures; it never asserts on timings.

    .venv/bin/python bench/run_overhead.py --n 10          # table + one JSON summary line
    .venv/bin/python bench/run_overhead.py --n 10 --json   # only the JSON summary

nbflow state goes to a fresh temporary NBFLOW_HOME (SQLite), removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent  # the venv's bin (not resolved: the venv python is a symlink)
VARIANTS = ("papermill-api", "papermill-cli", "nbflow-api", "nbflow-cli")


def write_notebook(path: Path) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    params = nbformat.v4.new_code_cell("x = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("y = x * 2")]
    nbformat.write(nb, str(path))


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def stats_ms(values: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in values]
    return {"median": statistics.median(ms), "p90": percentile(ms, 90), "min": min(ms), "n": len(ms)}


def ms_between(a: str | datetime | None, b: str | datetime | None) -> float | None:
    if a is None or b is None:
        return None
    a = datetime.fromisoformat(a) if isinstance(a, str) else a
    b = datetime.fromisoformat(b) if isinstance(b, str) else b
    return (b - a).total_seconds() * 1000


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.nb = workdir / "in.ipynb"
        self.out = workdir / "out.ipynb"
        self.home = workdir / "nbflow-home"
        write_notebook(self.nb)
        # In-process nbflow reads its settings from the environment; so does the CLI subprocess.
        os.environ["NBFLOW_HOME"] = str(self.home)
        os.environ.pop("NBFLOW_DATABASE_URL", None)
        self.env = dict(os.environ)
        self.api_runs: list[dict[str, Any]] = []  # client-side timestamps of each nbflow-api run
        self.cli_runs: list[dict[str, Any]] = []  # client-side timestamps of each nbflow-cli run

        import papermill

        from nbflow.core.runs import create_run
        from nbflow.execution.launcher import execute_run
        from nbflow.store import open_store

        self._papermill = papermill
        self._create_run = create_run
        self._execute_run = execute_run
        self.store = open_store()  # creates and migrates the fresh SQLite database

    # -- the four variants; each returns its wall time in seconds ------------------------------------
    def papermill_api(self) -> float:
        # The kernel inherits fd 2 and prints a "running over TCP without encryption" warning on it;
        # the subprocess variants capture theirs, so silence this one too (outside the timed part).
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        try:
            t = time.perf_counter()
            self._papermill.execute_notebook(str(self.nb), str(self.out), parameters={"x": 2},
                                             progress_bar=False, kernel_name="python3")
            return time.perf_counter() - t
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)

    def papermill_cli(self) -> float:
        cmd = [str(BIN / "papermill"), str(self.nb), str(self.out), "-p", "x", "2", "--no-progress-bar"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=self.env, cwd=self.workdir, capture_output=True, text=True)
        elapsed = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"papermill CLI failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return elapsed

    def nbflow_api(self) -> float:
        t0_wall = datetime.now(UTC)
        t = time.perf_counter()
        run = self._create_run(self.store, str(self.nb), {"x": "2"}, allow_path=True)
        t_created = time.perf_counter()
        ended = self._execute_run(self.store, run.id)
        elapsed = time.perf_counter() - t
        if ended.state != "COMPLETED":
            raise RuntimeError(f"nbflow run {run.id} ended {ended.state}: {ended.state_message}")
        self.api_runs.append({"id": run.id, "t0": t0_wall, "create_ms": (t_created - t) * 1000,
                              "total_ms": elapsed * 1000})
        return elapsed

    def nbflow_cli(self) -> float:
        cmd = [str(BIN / "nbflow"), "run", str(self.nb), "-p", "x", "2", "--no-progress"]
        t0_wall = datetime.now(UTC)
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=self.env, cwd=self.workdir, capture_output=True, text=True)
        elapsed = time.perf_counter() - t
        if proc.returncode != 0:
            raise RuntimeError(f"nbflow CLI failed ({proc.returncode}): {proc.stderr[-2000:]}")
        self.cli_runs.append({"id": self._newest_run_id(), "t0": t0_wall, "total_ms": elapsed * 1000})
        return elapsed

    def _newest_run_id(self) -> uuid.UUID:
        """The run the CLI just made: variants run one at a time, so it is the newest in the store."""
        from sqlalchemy import select

        from nbflow.store.models import Run

        with self.store.read() as session:
            return session.execute(select(Run.id).order_by(Run.created_at.desc()).limit(1)).scalar_one()

    def variant(self, name: str) -> Callable[[], float]:
        return getattr(self, name.replace("-", "_"))

    # -- nbflow's own timestamps -------------------------------------------------------------------
    def breakdown(self, client: dict[str, Any]) -> dict[str, Any]:
        from nbflow.core.runs import run_document
        from nbflow.store.models import Run

        with self.store.read() as session:
            doc = run_document(session, session.get(Run, client["id"]))
        cells = doc["cells"]
        end_wall = client["t0"].timestamp() * 1000 + client["total_ms"]
        ended = datetime.fromisoformat(doc["ended_at"]).timestamp() * 1000
        first_cell = cells[0]["started_at"] if cells else None
        last_cell = cells[-1]["ended_at"] if cells else None
        return {
            "id": doc["id"],
            "state": doc["state"],
            # caller's start -> run row inserted: CLI process start + imports (CLI only), flow/version
            # sync, kernelspec lookup, parameter validation, INSERT
            "call_to_created_ms": ms_between(client["t0"], doc["created_at"]),
            # run row inserted -> RUNNING written by the run process: spawn python, import nbflow.execution.execute
            # (+ papermill, sqlalchemy, ...), open the store
            "created_to_started_ms": ms_between(doc["created_at"], doc["started_at"]),
            # RUNNING -> COMPLETED, all inside the run process
            "started_to_ended_ms": ms_between(doc["started_at"], doc["ended_at"]),
            #   of which: RUNNING -> first cell starts (kernel start + wait for ready + cell_run rows)
            "started_to_first_cell_ms": ms_between(doc["started_at"], first_cell),
            #   the cells as nbflow recorded them, first start to last end
            "cells_ms": ms_between(first_cell, last_cell),
            #   last cell ended -> COMPLETED (kernel shutdown, output notebook write, final writes)
            "last_cell_to_ended_ms": ms_between(last_cell, doc["ended_at"]),
            # COMPLETED -> caller gets control back: run process exit, launcher re-reads the run
            # (+ CLI's run_document and interpreter exit)
            "ended_to_return_ms": end_wall - ended,
            "total_ms": client["total_ms"],
        }


def summarize_breakdowns(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    keys = [k for k in rows[0] if k.endswith("_ms")]
    out: dict[str, float | None] = {}
    for k in keys:
        vals = [r[k] for r in rows if r[k] is not None]
        out[k] = statistics.median(vals) if vals else None
    return out


def import_costs(reps: int) -> dict[str, float]:
    """Median wall time of a fresh interpreter importing what each side's run process imports."""
    snippets = {
        "python -c pass": "pass",
        "import papermill": "import papermill",
        "import nbflow.execution.execute": "import nbflow.execution.execute",
    }
    out = {}
    for label, code in snippets.items():
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(time.perf_counter() - t)
        out[label] = statistics.median(times) * 1000
    return out


def nbflow_revision() -> str:
    """The commit benchmarked, with ``+dirty`` if nbflow/ has uncommitted changes (it is under active work)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "nbflow"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10, help="measured repetitions of each variant (default 10)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured runs of each variant first (default 1)")
    ap.add_argument("--import-reps", type=int, default=3,
                    help="repetitions of the fresh-interpreter import timing (0 to skip; default 3)")
    ap.add_argument("--json", action="store_true", help="print only the one-line JSON summary")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (printed)")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be at least 1")

    def say(*a: Any) -> None:
        if not args.json:
            print(*a, flush=True)

    revision = nbflow_revision()
    workdir = Path(tempfile.mkdtemp(prefix="nbflow-bench-"))
    started = time.perf_counter()
    try:
        bench = Bench(workdir)
        say(f"nbflow vs papermill, 2-cell notebook, n={args.n} (+{args.warmup} warm-up) each, interleaved")
        say(f"nbflow {revision}  python {platform.python_version()}  cpus {os.cpu_count()}  "
            f"load avg {os.getloadavg()[0]:.2f}  workdir {workdir}")
        for _ in range(args.warmup):  # imports, kernelspec caches, flow registration, SQLite migration
            for name in VARIANTS:
                bench.variant(name)()
        bench.api_runs.clear()
        bench.cli_runs.clear()

        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for i in range(args.n):
            # rotate the order each round so no variant always runs first/last (cache, CPU state)
            order = VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]
            for name in order:
                times[name].append(bench.variant(name)())
            say(f"  round {i + 1}/{args.n}: " + "  ".join(f"{n} {times[n][-1] * 1000:,.0f}" for n in VARIANTS))

        stats = {name: stats_ms(v) for name, v in times.items()}
        ratios = {
            "nbflow_api/papermill_api": stats["nbflow-api"]["median"] / stats["papermill-api"]["median"],
            "nbflow_cli/papermill_cli": stats["nbflow-cli"]["median"] / stats["papermill-cli"]["median"],
        }
        api_rows = [bench.breakdown(r) for r in bench.api_runs]
        cli_rows = [bench.breakdown(r) for r in bench.cli_runs]
        imports = import_costs(args.import_reps) if args.import_reps > 0 else {}

        say("")
        say(f"{'variant':<15}{'median ms':>11}{'p90 ms':>10}{'min ms':>10}")
        for name in VARIANTS:
            s = stats[name]
            say(f"{name:<15}{s['median']:>11,.0f}{s['p90']:>10,.0f}{s['min']:>10,.0f}")
        say("")
        for k, v in ratios.items():
            say(f"ratio of medians {k}: {v:.2f}x")

        say("")
        say("nbflow run breakdown from the store (ms): last run / median of all measured runs")
        say(f"{'':<28}{'api last':>10}{'api med':>10}{'cli last':>10}{'cli med':>10}")
        api_med, cli_med = summarize_breakdowns(api_rows), summarize_breakdowns(cli_rows)
        labels = {
            "call_to_created_ms": "call -> created_at",
            "created_to_started_ms": "created_at -> started_at",
            "started_to_ended_ms": "started_at -> ended_at",
            "started_to_first_cell_ms": "  started -> 1st cell",
            "cells_ms": "  cells (recorded)",
            "last_cell_to_ended_ms": "  last cell -> ended",
            "ended_to_return_ms": "ended_at -> caller returns",
            "total_ms": "total wall",
        }
        for key, label in labels.items():
            say(f"{label:<28}{fmt(api_rows[-1][key]):>10}{fmt(api_med[key]):>10}"
                f"{fmt(cli_rows[-1][key]):>10}{fmt(cli_med[key]):>10}")
        say(f"last api run {api_rows[-1]['id']}: created_at -> started_at "
            f"{fmt(api_rows[-1]['created_to_started_ms'])} ms, started_at -> ended_at "
            f"{fmt(api_rows[-1]['started_to_ended_ms'])} ms")
        if imports:
            say("")
            say("fresh interpreter import cost (median wall ms, interpreter start and exit included):")
            for k, v in imports.items():
                say(f"  {k:<24}{v:>8,.0f}")

        summary = {
            "bench": "nbflow_run_overhead",
            "date": datetime.now(UTC).date().isoformat(),
            "nbflow": revision,
            "n": args.n,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "ms": {name: {k: round(v, 1) for k, v in s.items()} for name, s in stats.items()},
            "ratios": {k: round(v, 3) for k, v in ratios.items()},
            "nbflow_api_breakdown_median_ms": {k: None if v is None else round(v, 1) for k, v in api_med.items()},
            "nbflow_cli_breakdown_median_ms": {k: None if v is None else round(v, 1) for k, v in cli_med.items()},
            "import_ms": {k: round(v, 1) for k, v in imports.items()},
            "load_avg_1m_end": round(os.getloadavg()[0], 2),
            "bench_seconds": round(time.perf_counter() - started, 1),
        }
        say("")
        print(json.dumps(summary, separators=(",", ":")), flush=True)
    finally:
        from nbflow.store import reset_stores

        reset_stores()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
