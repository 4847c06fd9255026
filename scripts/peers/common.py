"""Shared helpers of the peer benchmark scripts (gemm.py, llm.py, minilm.py).

Timing (median after warm-up), the machine's load while a script runs (the development machine
is shared), running ``kiln bench model`` and reading its JSON line, running a measurement in a
child process under a time limit (torch.compile can take minutes or fail), and printing a table
with kiln's ratio to each peer.
"""

import json
import multiprocessing
import os
import statistics
import subprocess
import time
import traceback

THREADS = 2
KILN_CACHE = os.environ.get("KILN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kiln"))


def median_secs(f, runs, warmup=2):
    """Median wall time of `runs` calls of f after `warmup` calls."""
    for _ in range(warmup):
        f()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def loadavg():
    """The 1-minute load average and the number of runnable processes (from /proc/loadavg)."""
    with open("/proc/loadavg", encoding="ascii") as f:
        parts = f.read().split()
    return {"load1": float(parts[0]), "running": parts[3]}


def kiln_bench_model(kiln, args, timeout):
    """Runs `kiln bench model ARGS --json`; returns (dict, None) or (None, reason)."""
    if not os.path.isfile(kiln):
        return None, f"no binary at {kiln}"
    cmd = [kiln, "bench", "model", *args, "--json"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, f"`{' '.join(cmd)}` ran past {timeout} s"
    if p.returncode != 0:
        msg = (p.stderr.strip() or p.stdout.strip()).splitlines()
        return None, f"exit {p.returncode}: {msg[-1] if msg else 'no message'}"
    for line in reversed(p.stdout.strip().splitlines()):
        try:
            return json.loads(line), None
        except json.JSONDecodeError:
            continue
    return None, "no JSON line in its output"


def _child(queue, fn, args):
    try:
        queue.put(("ok", fn(*args)))
    except BaseException as e:  # report any failure (compile errors, missing compiler) as text
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        queue.put(("err", last[:300]))


def in_child(fn, args, timeout):
    """Runs fn(*args) in a spawned child process; returns (result, None) or (None, reason).

    fn must be a module-level function and its result picklable.
    """
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_child, args=(queue, fn, args))
    p.start()
    try:
        status, value = queue.get(timeout=timeout)
    except Exception:  # queue.Empty: the time limit passed
        p.terminate()
        p.join()
        return None, f"ran past {timeout} s"
    p.join()
    return (value, None) if status == "ok" else (None, value)


def fmt(x, digits=1):
    return "—" if x is None else f"{x:,.{digits}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def print_table(rows, peers, unit):
    """rows: [(label, {peer: value or None, ..., "kiln": value or None})]; prints kiln ÷ peer."""
    head = ["workload"] + peers + ["kiln"] + [f"kiln ÷ {p}" for p in peers]
    lines = [head]
    for label, vals in rows:
        lines.append(
            [label]
            + [fmt(vals.get(p)) for p in peers]
            + [fmt(vals.get("kiln"))]
            + [fmt(ratio(vals.get("kiln"), vals.get(p)), 2) for p in peers]
        )
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    print(f"({unit})")
    for r in lines:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
