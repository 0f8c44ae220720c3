"""Soak: hundreds of swaps under load, and nothing lost, leaked or left behind.

Run from anywhere with the interpreter that has hotsup installed
(``python bench/soak.py [--swaps N] [--warmup W] [--clients K] [--json-only]
[--keep]``). Everything happens in a fresh temporary directory on 127.0.0.1
with a port picked by the kernel:

``hotsup start`` serves a copy of the demo bundle ``bundles/counter`` (line
protocol: ``incr`` / ``get`` -> ``count=N generation=G ...``). K client threads
loop connect / ``incr`` / read one line / close. The benchmark rewrites the
bundle module W + N times (a different trailing comment each time, saved the
way editors save: a temp file renamed over it) and after each write waits for
the first reply from the next generation, i.e. from the new code. The first W
swaps warm up; then the supervisor's and the zygote's open fds
(``/proc/PID/fd``) and RSS (``VmRSS``) are read, and read again after the last
swap, each time once the old generation has gone and the supervisor's fd count
has stopped moving. The load keeps running throughout.

One JSON object goes to stdout, a table to stderr. ``pass`` is true when no
request failed, the final ``get`` equals the number of successful ``incr``s
(the count was carried through every swap), fds and RSS ended within 5 % of
where they started, no process of the supervisor's is a zombie, exactly one
worker is alive, every swap was served within its deadline, and ``hotsup``
exited 0 leaving no process behind. Exit status: 0 when it passes, 1 when not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from clients import Load, ask, free_port, wait_serving
from processes import (
    SUPERVISOR_CONFIG,
    all_processes,
    cmdline,
    kill_session,
    notable_log_lines,
    open_fds,
    rss_kib,
    session_pids,
    stop_process,
)

DEMO = Path(__file__).resolve().parent.parent / "bundles" / "counter"
REPLY = re.compile(rb"count=(?P<count>\d+)(?: mine=\d+)? generation=(?P<mark>\d+)")
BIND = re.compile(r'^bind = ".*"$', re.MULTILINE)
SWAP_DEADLINE = 15.0
SETTLE_DEADLINE = 15.0
EXIT_DEADLINE = 10.0
FLAT = 0.05


@dataclass(frozen=True)
class Sample:
    """The supervisor's family, read from /proc once it has settled after a swap."""

    swap: int
    supervisor_fds: int | None
    supervisor_rss_kib: int | None
    zygote_pid: int | None
    zygote_fds: int | None
    zygote_rss_kib: int | None
    workers: int
    zombies: int
    settled: bool


#: The command name of the child the zygote keeps forked for the next spawn.
SPARE = "hotsup-spare"


def family(sup: int) -> tuple[int | None, int, int]:
    """(zygote pid, live workers, zombies) of the supervisor ``sup``.

    A zombie is any process in state Z whose parent is the supervisor or the
    zygote, or that belongs to the supervisor's session.
    """
    procs = all_processes()
    zygotes = [p.pid for p in procs if p.ppid == sup and p.state != "Z"
               and "hotsup.worker.zygote" in cmdline(p.pid)]
    zygote = zygotes[0] if len(zygotes) == 1 else None
    # The zygote's children: the workers, and the spare it forks ahead of time.
    workers = sum(1 for p in procs if zygote is not None and p.ppid == zygote
                  and p.state != "Z" and p.name != SPARE)
    zombies = sum(1 for p in procs if p.state == "Z"
                  and (p.ppid in (sup, zygote) or p.session == sup))
    return zygote, workers, zombies


def settle(sup: int, swap: int) -> Sample:
    """Wait until one worker is left and the supervisor's fd count holds still, then read.

    An old generation retires after its successor serves: until it has exited
    and the supervisor has closed its pipes, there are more fds than at rest.
    Past the deadline it reads anyway and says so (``settled`` false).
    """
    deadline = time.monotonic() + SETTLE_DEADLINE
    last: int | None = None
    settled = False
    while time.monotonic() < deadline:
        _, workers, _ = family(sup)
        fds = open_fds(sup)
        if workers == 1 and fds is not None and fds == last:
            settled = True
            break
        last = fds if workers == 1 else None
        time.sleep(0.1)
    zygote, workers, zombies = family(sup)
    return Sample(swap, open_fds(sup), rss_kib(sup), zygote,
                  open_fds(zygote) if zygote else None, rss_kib(zygote) if zygote else None,
                  workers, zombies, settled)


def copy_demo(work: Path) -> tuple[Path, int]:
    """A copy of the demo counter bundle on a free port: (its module, the port)."""
    port = free_port()
    bundle = work / "bundles" / "counter"
    shutil.copytree(DEMO, bundle, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    manifest = bundle / "bundle.toml"
    text, found = BIND.subn(f'bind = "127.0.0.1:{port}"', manifest.read_text())
    if found != 1:
        raise RuntimeError(f"{DEMO / 'bundle.toml'}: expected one 'bind = ...' line, "
                           f"found {found}")
    manifest.write_text(text)
    (work / "config.toml").write_text(SUPERVISOR_CONFIG)
    return bundle / "counter.py", port


def save(path: Path, text: str) -> None:
    """Save the way editors do: a hidden temp file renamed over the old one."""
    temp = path.with_name(f".{path.name}.soak")
    temp.write_text(text)
    os.replace(temp, path)


def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    return sorted_values[max(1, math.ceil(p / 100 * len(sorted_values))) - 1]


def ratio(start: int | None, end: int | None) -> float | None:
    return round(end / start, 3) if start and end is not None else None


def flat(r: float | None) -> bool:
    return r is not None and abs(r - 1) <= FLAT


@dataclass
class Run:
    """One soak: the supervisor, its load, and what was seen."""

    work: Path
    swaps: int
    warmup: int
    clients: int
    sample_every: int
    quiet: bool = False
    proc: subprocess.Popen[bytes] | None = None
    load: Load | None = None
    latencies: list[float] | None = None
    timed_out: int = 0
    aborted: str | None = None
    stopped: tuple[int | None, int] | None = None

    def execute(self) -> dict[str, Any]:
        module, port = copy_demo(self.work)
        original = module.read_text()
        started = time.monotonic()
        with open(self.work / "hotsup.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hotsup.supervisor.cli", "start", "config.toml"],
                cwd=self.work, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        sup = self.proc.pid
        wait_serving(port, self.proc, "hotsup", REPLY)
        self.load = load = Load(port, self.clients, REPLY)
        load.start()
        if load.wait_tag("1", time.monotonic() + SWAP_DEADLINE) is None:
            raise RuntimeError(f"no reply from generation 1 within {SWAP_DEADLINE:g}s")
        self.latencies = []
        trend: list[Sample] = []
        self._swaps(module, original, 1, self.warmup)
        start = settle(sup, self.warmup)
        trend.append(start)
        first, last = self.warmup + 1, self.warmup + self.swaps
        for chunk_start in range(first, last + 1, self.sample_every):
            chunk_end = min(chunk_start + self.sample_every - 1, last)
            if not self._swaps(module, original, chunk_start, chunk_end):
                break
            trend.append(settle(sup, chunk_end))
            if not self.quiet:
                progress(trend[-1], last)
        end = trend[-1]
        load.stop()
        final = REPLY.search(ask(port, b"get\n", timeout=10.0))
        exit_status, leftovers = self._stop()
        return self._report(load, start, end, trend, final, exit_status, leftovers,
                            time.monotonic() - started)

    def _swaps(self, module: Path, original: str, first: int, last: int) -> bool:
        """Swaps ``first``..``last`` (swap i serves generation i + 1); False if one timed out."""
        assert self.load is not None and self.latencies is not None
        for i in range(first, last + 1):
            t0 = time.monotonic()
            save(module, f"{original}\n# soak swap {i}\n")
            seen = self.load.wait_tag(str(i + 1), t0 + SWAP_DEADLINE)
            if seen is None:
                # The generations would no longer line up with the swaps: stop here.
                self.timed_out += 1
                self.aborted = f"swap {i}: generation {i + 1} not served within " \
                               f"{SWAP_DEADLINE:g}s"
                print(self.aborted, file=sys.stderr)
                return False
            if i > self.warmup:
                self.latencies.append(seen - t0)
            time.sleep(random.uniform(0.01, 0.03))  # not in lock-step with the clients
        return True

    def _stop(self) -> tuple[int | None, int]:
        """Stop hotsup (SIGTERM, wait, SIGKILL); kill, by pid, what outlived it. Once."""
        if self.load is not None:
            self.load.stop()
        if self.proc is None:
            return None, 0
        if self.stopped is not None:  # never signal a pid twice: it may be reused by now
            return self.stopped
        stop_process(self.proc, group=True)
        sid = self.proc.pid
        # The zygote and workers leave on their own once the supervisor is gone.
        deadline = time.monotonic() + EXIT_DEADLINE
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftovers = kill_session(sid)
        self.stopped = (self.proc.returncode, len(leftovers))
        return self.stopped

    def cleanup(self) -> None:
        """Idempotent: after an exception or Ctrl-C, nothing we started is left."""
        self._stop()

    def _report(self, load: Load, start: Sample, end: Sample, trend: list[Sample],
                final: re.Match[bytes] | None, exit_status: int | None, leftovers: int,
                duration: float) -> dict[str, Any]:
        done = sorted(x * 1000 for x in self.latencies or [])

        def ms(p: float) -> float | None:
            value = percentile(done, p)
            return round(value, 1) if value is not None else None

        successful = len(load.replies)
        final_count = int(final["count"]) if final else None

        def resource(attr: str) -> dict[str, Any]:
            a, b = getattr(start, attr), getattr(end, attr)
            return {"start": a, "end": b, "ratio": ratio(a, b)}

        measured = {name: resource(name) for name in
                    ("supervisor_fds", "supervisor_rss_kib", "zygote_fds", "zygote_rss_kib")}
        is_flat = all(flat(m["ratio"]) for m in measured.values())
        supervisor = {"pid": self.proc.pid if self.proc else None,
                      "fds": measured["supervisor_fds"],
                      "rss_kib": measured["supervisor_rss_kib"]}
        zygote = {"pid_start": start.zygote_pid, "pid_end": end.zygote_pid,
                  "fds": measured["zygote_fds"], "rss_kib": measured["zygote_rss_kib"]}
        result: dict[str, Any] = {
            "swaps": self.swaps,
            "warmup_swaps": self.warmup,
            "swaps_done": len(self.latencies or []),
            "swaps_timed_out": self.timed_out,
            "aborted": self.aborted,
            "swap_ms": {"p50": ms(50), "p99": ms(99), "max": ms(100)},
            "clients": self.clients,
            "requests": load.requests,
            "failed_requests": sum(load.failures.values()),
            "failures": dict(sorted(load.failures.items())),
            "successful_incrs": successful,
            "final_count": final_count,
            "count_carried": final_count == successful,
            "supervisor": supervisor,
            "zygote": zygote,
            "flat_within": FLAT,
            "flat": is_flat,
            "settled": start.settled and end.settled,
            "zombies": end.zombies,
            "workers_end": end.workers,
            "exit_status": exit_status,
            "leftover_processes": leftovers,
            "duration_s": round(duration, 1),
            "trend": [asdict(s) for s in trend],
        }
        result["pass"] = (result["failed_requests"] == 0 and result["count_carried"]
                          and is_flat and end.zombies == 0 and end.workers == 1
                          and self.timed_out == 0 and exit_status == 0 and leftovers == 0)
        return result


def progress(sample: Sample, last: int) -> None:
    print(f"swap {sample.swap}/{last}: supervisor fds {sample.supervisor_fds} "
          f"rss {sample.supervisor_rss_kib} KiB, zygote fds {sample.zygote_fds} "
          f"rss {sample.zygote_rss_kib} KiB, workers {sample.workers}, "
          f"zombies {sample.zombies}", file=sys.stderr, flush=True)


def table(r: dict[str, Any]) -> str:
    lat = r["swap_ms"]
    rows = [
        f"soak: {r['swaps_done']}/{r['swaps']} swaps (+{r['warmup_swaps']} warm-up), "
        f"{r['clients']} clients, {r['duration_s']} s"
        + (f"  ABORTED: {r['aborted']}" if r["aborted"] else ""),
        f"swap ms: p50 {lat['p50']}  p99 {lat['p99']}  max {lat['max']}",
        f"requests {r['requests']}  failed {r['failed_requests']}  count carried "
        f"{r['count_carried']} (final {r['final_count']}, successful incr "
        f"{r['successful_incrs']})",
        f"{'':12}{'fds start':>10}{'end':>6}{'ratio':>7}{'RSS KiB start':>15}{'end':>9}"
        f"{'ratio':>7}",
    ]
    for name in ("supervisor", "zygote"):
        part = r[name]
        fds, rss = part["fds"], part["rss_kib"]
        rows.append(f"{name:12}{fds['start']!s:>10}{fds['end']!s:>6}{fds['ratio']!s:>7}"
                    f"{rss['start']!s:>15}{rss['end']!s:>9}{rss['ratio']!s:>7}")
    rows.append(f"flat within {r['flat_within']:.0%}: {r['flat']}  zombies {r['zombies']}  "
                f"live workers {r['workers_end']}  exit status {r['exit_status']}  "
                f"leftovers {r['leftover_processes']}  ->  {'PASS' if r['pass'] else 'FAIL'}")
    return "\n".join(rows)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so the finally blocks clean up.
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=500, help="measured swaps (default 500)")
    parser.add_argument("--warmup", type=int, default=20,
                        help="swaps before the first reading (default 20)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--sample-every", type=int, default=50,
                        help="read fds and RSS every this many swaps (default 50)")
    parser.add_argument("--json-only", action="store_true", help="no table on stderr")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (config, bundle, hotsup.log)")
    args = parser.parse_args(argv)
    if args.swaps < 1 or args.warmup < 0 or args.clients < 1 or args.sample_every < 1:
        parser.error("--swaps, --clients and --sample-every must be >= 1, --warmup >= 0")

    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="hotsup-soak-"))
    run = Run(work, args.swaps, args.warmup, args.clients, args.sample_every,
              quiet=args.json_only)
    try:
        result = run.execute()
        result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                             "platform": platform.platform()}
        print(json.dumps(result))
        if not args.json_only:
            print(table(result), file=sys.stderr)
            notable = notable_log_lines(work / "hotsup.log")
            if notable:
                print("hotsup log, errors and warnings:", file=sys.stderr)
                print(textwrap.indent("\n".join(notable), "  "), file=sys.stderr)
        return 0 if result["pass"] else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        run.cleanup()
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
