"""Trigger-to-COMPLETED through the runner, warm and cold, against bare papermill; and runs per minute.

Side by side in one process run, on the same generated 2-cell notebook (kernel ``python3``):

  papermill        ``papermill.execute_notebook(in, out, parameters={'x': 2})`` in this process
  runner-cold      ``create_run`` in this process, executed by a ``Runner`` (1 slot, no warm kernels)
                   running in a thread of this process; timed from just before ``create_run`` to the
                   run's stored ``ended_at`` (the COMPLETED write)
  runner-warm      the same with ``warm_kernels=1``; each trigger waits until a warm slot is ready
                   first (the steady state of a server that is not saturated)

Latency variants are interleaved round by round. Then throughput: ``--burst`` runs queued at once and
drained by a ``Runner`` with 2 slots (cold, then warm with ``--warm-kernels`` slots per kernel), and bare
papermill in 2 processes executing the same number of notebooks one after another, as runs/minute.

    .venv/bin/python bench/runner_latency.py --n 10 --burst 40

It measures; it never asserts on timings. nbflow state goes to a fresh temporary NBFLOW_HOME (SQLite).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from run_overhead import percentile, write_notebook  # noqa: E402


def wait_ended(store: Any, run_ids: list[uuid.UUID], timeout: float = 300, poll: float = 0.002) -> list[Any]:
    """Wait for the runs to end. Timings come from the stored ``ended_at``, not from when this notices;
    ``poll`` only has to be short enough not to delay the next trigger (and long enough, in the
    throughput part, not to take CPU from the runs)."""
    from sqlalchemy import select

    from nbflow.store.models import Run

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with store.read() as session:
            runs = list(session.execute(select(Run).where(Run.id.in_(run_ids))).scalars())
        if len(runs) == len(run_ids) and all(r.ended_at is not None for r in runs):
            bad = [r for r in runs if r.state != "COMPLETED"]
            if bad:
                raise SystemExit(f"run {bad[0].id} ended {bad[0].state}: {bad[0].error}")
            return runs
        time.sleep(poll)
    raise SystemExit("runs did not end in time")


class RunnerThread:
    def __init__(self, store: Any, *, slots: int, warm: int) -> None:
        from nbflow.services.runner import Runner

        self.runner = Runner(store, slots=slots, poll_interval=5.0, warm_kernels=warm)
        self.thread = threading.Thread(target=self.runner.run, daemon=True)
        self.thread.start()

    def wait_warm(self, kernel: str = "python3", count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.runner.pool.ready_count(kernel) < count:
            if time.monotonic() > deadline:
                raise SystemExit("the warm pool never became ready")
            time.sleep(0.01)

    def stop(self) -> None:
        self.runner.request_stop()
        self.thread.join(120)


def trigger_latency(store: Any, nb: Path) -> float:
    from nbflow.core.runs import create_run

    t0 = time.time()
    run = create_run(store, str(nb), {"x": "2"}, allow_path=True)
    (ended,) = wait_ended(store, [run.id])
    return (ended.ended_at.timestamp() - t0) * 1000


def papermill_once(nb: Path, out: Path) -> float:
    import papermill

    t0 = time.perf_counter()
    papermill.execute_notebook(str(nb), str(out), parameters={"x": 2}, progress_bar=False, kernel_name="python3")
    return (time.perf_counter() - t0) * 1000


PAPERMILL_WORKER = """
import sys, papermill
nb, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    papermill.execute_notebook(nb, f"{out}-{i}.ipynb", parameters={"x": 2}, progress_bar=False, kernel_name="python3")
"""


def papermill_throughput(nb: Path, tmp: Path, total: int) -> float:
    """Two processes (papermill imported once in each), each executing total/2 notebooks in a row."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", PAPERMILL_WORKER, str(nb), str(tmp / f"pm{w}"), str(total // 2)],
                              stderr=subprocess.DEVNULL)
             for w in range(2)]
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit("papermill worker failed")
    return total / (time.perf_counter() - t0) * 60


def runner_throughput(store: Any, nb: Path, total: int, warm: int) -> float:
    from nbflow.core.runs import create_run

    ids = [create_run(store, str(nb), {"x": "2"}, allow_path=True).id for _ in range(total)]
    # The runs are queued; the clock starts when the runner does (a warm pool starts empty).
    t0 = time.time()
    rt = RunnerThread(store, slots=2, warm=warm)
    try:
        runs = wait_ended(store, ids, timeout=600, poll=0.25)
    finally:
        rt.stop()
    return total / (max(r.ended_at.timestamp() for r in runs) - t0) * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10, help="measured triggers per latency variant")
    parser.add_argument("--burst", type=int, default=40, help="runs queued at once for the throughput part")
    parser.add_argument("--warm-kernels", type=int, default=2, help="warm slots per kernel for throughput")
    parser.add_argument("--json", action="store_true", help="only print the JSON summary")
    parser.add_argument("--only", choices=["latency", "throughput"], help="run one part only")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="nbflow-bench-"))
    os.environ["NBFLOW_HOME"] = str(tmp / "home")
    os.environ.pop("NBFLOW_DATABASE_URL", None)
    say = (lambda *a: None) if args.json else print
    try:
        from nbflow.store import open_store

        nb = tmp / "trivial.ipynb"
        write_notebook(nb)
        store = open_store()
        say(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cpus")
        papermill_once(nb, tmp / "warmup.ipynb")
        summary: dict[str, Any] = {}
        if args.only in (None, "latency"):
            # Two runners on one store would share the runs: each variant runs alone, started afresh each round.
            results: dict[str, list[float]] = {"papermill": [], "runner-cold": [], "runner-warm": []}
            trigger_latency_warmup = True
            for _ in range(args.n + 1):
                results["papermill"].append(papermill_once(nb, tmp / "out.ipynb"))
                rt = RunnerThread(store, slots=1, warm=0)
                results["runner-cold"].append(trigger_latency(store, nb))
                rt.stop()
                rt = RunnerThread(store, slots=1, warm=1)
                rt.wait_warm()
                results["runner-warm"].append(trigger_latency(store, nb))
                rt.stop()
                if trigger_latency_warmup:  # the first round pays imports and first connections: drop it
                    for values in results.values():
                        values.clear()
                    trigger_latency_warmup = False
            medians = {k: statistics.median(v) for k, v in results.items()}
            say(f"\ntrigger-to-COMPLETED, n={args.n}")
            say(f"{'variant':<14}{'median ms':>10}{'p90 ms':>9}{'min ms':>9}")
            for name, values in results.items():
                say(f"{name:<14}{medians[name]:>10.0f}{percentile(values, 90):>9.0f}{min(values):>9.0f}")
            say(f"papermill / runner-warm: {medians['papermill'] / medians['runner-warm']:.1f}x faster warm")
            say(f"runner-cold / papermill: {medians['runner-cold'] / medians['papermill']:.2f}")
            summary.update(latency_ms_median={k: round(v, 1) for k, v in medians.items()},
                           warm_speedup_vs_papermill=round(medians["papermill"] / medians["runner-warm"], 2),
                           cold_ratio_vs_papermill=round(medians["runner-cold"] / medians["papermill"], 3))
        if args.only in (None, "throughput"):
            say(f"\nthroughput, {args.burst} trivial runs, 2 slots / 2 processes")
            tput = {
                "papermill-2proc": papermill_throughput(nb, tmp, args.burst),
                "runner-cold": runner_throughput(store, nb, args.burst, 0),
                f"runner-warm{args.warm_kernels}": runner_throughput(store, nb, args.burst, args.warm_kernels),
            }
            for name, value in tput.items():
                say(f"{name:<18}{value:>8.0f} runs/min")
            summary["runs_per_minute"] = {k: round(v) for k, v in tput.items()}
        summary["load_average"] = os.getloadavg()[0]
        print(json.dumps(summary))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
