"""Timing, the machine description and result files, for every benchmark script.

Results land in benchmarks/out/ (OUT), wherever a script is run from."""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "out"  # benchmarks/out


def best_of(fn, repeats: int = 2) -> float:
    """Best wall time of fn() over repeats (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


def write_result(name: str, payload: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    payload = {"date": date.today().isoformat(), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2))
    return path


def run_measured(cmd: list[str], env: dict | None = None, poll_s: float = 0.02) -> dict:
    """Run a command; sample its /proc status for the peak RssAnon and its final VmHWM (bytes)."""
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak_anon = vmhwm = 0
    t0 = time.perf_counter()
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
                elif line.startswith("VmHWM:"):
                    vmhwm = max(vmhwm, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(poll_s)
    out, err = proc.communicate()
    return {
        "returncode": proc.returncode,
        "seconds": time.perf_counter() - t0,
        "peak_rss_anon": peak_anon,
        "vmhwm": vmhwm,
        "stdout": out,
        "stderr": err[-2000:],
    }
