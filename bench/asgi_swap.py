"""ASGI swaps under load: hotsup against uvicorn --reload, gunicorn + HUP and plain uvicorn.

Run from anywhere with the interpreter that has hotsup installed
(``python bench/asgi_swap.py [--swaps N] [--peer-swaps M] ...``; ``--help``).
For each app variant (``trivial``, and ``slow_import`` whose framework import
takes 0.3 s), with every contender (see ``contenders.py``) in a fresh
temporary directory on 127.0.0.1:

1. start the servers one after the other, each waited for until it answers
   (``start_s``);
2. steady phase: the load (``httpload``: short-lived and keep-alive clients)
   without any change, ``--steady-seconds`` per server, taken in rounds that
   alternate between the servers (side by side): throughput and failures;
3. swap phase, one server after the other (those that reload): under the same
   load, rewrite the app
   ``--swaps`` times (hotsup) or ``--peer-swaps`` times (peers), each time with
   a new ``VERSION``. Latency of a swap = the first response of the new
   version minus the moment just before the write (``time.monotonic()``).
   The next write comes 50-150 ms after that response. Per swap: latency,
   failed requests, and whether the app's counter was carried (every count the
   new version served is above every count the old one served).

One JSON object goes to stdout; a table with a pass/fail line per target of
the issue goes to stderr. Every process the bench started is stopped at the
end, by session, also on Ctrl-C. Exit status 0 when every contender was
measured (whatever the targets say), 1 when one failed to run, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop
from asgi_apps import VARIANTS, Variant
from contenders import CONTENDERS, SWAP_PEERS, THROUGHPUT_PEERS, Contender, Server
from httpload import FAILURES, Load, Mode, Outcome, Recorder, probe
from processes import notable_log_lines
from sessions import Sessions
from stats import machine, percentile, ratio

START_DEADLINE = 30.0  # seconds for a server to answer its first request
SWAP_DEADLINE = 15.0  # seconds for a write to reach clients before the swap counts as lost
GIVE_UP_AFTER = 3  # consecutive lost swaps: the contender is stuck, stop its phase
SETTLE = (0.05, 0.15)  # seconds between a swap's first new response and the next write

#: Swap-latency ceiling as a fraction of uvicorn --reload's p50, per variant.
RELOAD_FRACTION = {"trivial": 0.5, "slow_import": 0.25}
#: Issue 5's targets, with issue 12's swap latency: p50 <= 40 ms, p99 <= 80 ms,
#: and a p50 below gunicorn + HUP's (told at the write, no watching delay).
TARGETS = {"p50_ms": 40, "p99_ms": 80, "throughput_vs_uvicorn": 0.95,
           "p50_vs_uvicorn_reload": RELOAD_FRACTION, "p50_vs_gunicorn_hup": 1.0}


class ContenderError(Exception):
    """A contender could not be measured (did not start, died, got stuck)."""


@dataclass(frozen=True)
class Options:
    swaps: int
    peer_swaps: int
    steady_seconds: float
    steady_rounds: int
    short_clients: int
    keepalive_clients: int
    request_timeout: float
    watch_quiet_ms: int


# -- phases --------------------------------------------------------------------------


async def wait_serving(server: Server) -> float:
    """Seconds until the server answers with a valid response."""
    fatal = re.compile(server.contender.fatal) if server.contender.fatal else None
    started = time.monotonic()
    while time.monotonic() < started + START_DEADLINE:
        if server.proc.poll() is not None:
            raise ContenderError(f"exited with status {server.proc.returncode} before serving"
                                 f"{_log_tail(server.log)}")
        if await probe(server.port) is not None:
            return time.monotonic() - started
        if fatal is not None and (match := fatal.search(_read(server.log))):
            raise ContenderError(f"will not serve: {match[0].strip()}")
        await asyncio.sleep(0.02)
    raise ContenderError(f"no answer on port {server.port} within {START_DEADLINE:g}s"
                         f"{_log_tail(server.log)}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _log_tail(path: Path, lines: int = 5) -> str:
    tail = _read(path).splitlines()[-lines:]
    return "; log: " + " | ".join(line.strip() for line in tail) if tail else ""


async def steady(servers: dict[str, Server], opts: Options) -> dict[str, dict[str, Any]]:
    """The load without any change, side by side: ``steady_rounds`` rounds, each
    giving every server an equal slice of ``steady_seconds``, in a rotating order,
    so a machine that gets busier or quieter meanwhile touches them all alike.
    ``throughput_rps`` is the median of the rounds' (``rounds_rps``): one round
    disturbed by another process on the machine does not move it."""
    recorders = {name: Recorder() for name in servers}
    seconds = dict.fromkeys(servers, 0.0)
    rounds: dict[str, list[float]] = {name: [] for name in servers}
    slice_ = opts.steady_seconds / opts.steady_rounds
    order = list(servers)
    for round_ in range(opts.steady_rounds):
        for name in order[round_ % len(order):] + order[:round_ % len(order)]:
            before = recorders[name].ok_total()
            took = await run_load(servers[name], recorders[name], opts, asyncio.sleep(slice_),
                                  slice_)
            seconds[name] += took
            rounds[name].append(round((recorders[name].ok_total() - before) / took, 1))
    figures = {}
    for name in servers:
        figures[name] = _phase_figures(recorders[name], seconds[name])
        figures[name]["throughput_rps"] = statistics.median(rounds[name])
        figures[name]["rounds_rps"] = rounds[name]
    return figures


async def swapping(server: Server, variant: Variant, opts: Options,
                   swaps: int) -> dict[str, Any]:
    """The load across ``swaps`` rewrites of the app."""
    recorder = Recorder()
    latencies: list[float | None] = []

    async def swap() -> None:
        latencies.extend(await swap_loop(server, variant, recorder, swaps))

    bound = (swaps + 1) * (SWAP_DEADLINE + SETTLE[1])  # the swap loop's own worst case
    seconds = await run_load(server, recorder, opts, swap(), bound)
    return {**_phase_figures(recorder, seconds), **_swap_figures(recorder, latencies)}


async def run_load(server: Server, recorder: Recorder, opts: Options,
                   meanwhile: Coroutine[Any, Any, None], bound: float) -> float:
    """Load ``server`` while ``meanwhile`` runs; the seconds it ran.

    The clients stop by themselves ``bound`` (+5) seconds after they started,
    even if ``meanwhile`` never returns; each ends the request in progress first.
    """
    load = Load(server.port, opts.short_clients, opts.keepalive_clients, opts.request_timeout,
                recorder)
    stop = asyncio.Event()
    started = time.monotonic()
    clients = asyncio.create_task(load.run(stop, started + bound + 5))
    try:
        await meanwhile
    finally:
        seconds = time.monotonic() - started
        stop.set()
        await clients
    return seconds


async def swap_loop(server: Server, variant: Variant, recorder: Recorder,
                    swaps: int) -> list[float | None]:
    """Write v1..v{swaps}; each latency in seconds, None for a swap never seen."""
    current = await recorder.first_response("v0", time.monotonic() + SWAP_DEADLINE)
    if current is None:
        raise ContenderError("the load got no answer from v0 before the first swap")
    latencies: list[float | None] = []
    for i in range(1, swaps + 1):
        recorder.swap = i
        version = f"v{i}"
        written = time.monotonic()
        server.write(variant, version)
        seen = await recorder.first_response(version, written + SWAP_DEADLINE)
        latencies.append(None if seen is None else seen - written)
        if seen is None:
            if server.proc.poll() is not None:
                raise ContenderError(f"exited with status {server.proc.returncode} "
                                     f"during swap {i}{_log_tail(server.log)}")
            print(f"{server.contender.name}: swap {i}: no response from {version} within "
                  f"{SWAP_DEADLINE:g}s", file=sys.stderr)
            if latencies[-GIVE_UP_AFTER:] == [None] * GIVE_UP_AFTER:
                break
        await asyncio.sleep(random.uniform(*SETTLE))
    return latencies


def _phase_figures(recorder: Recorder, seconds: float) -> dict[str, Any]:
    ok = recorder.ok_total()
    failed = {mode.value: recorder.failed_total(mode) for mode in Mode}
    return {
        "seconds": round(seconds, 2),
        "ok": ok,
        "ok_by_mode": {mode.value: recorder.outcomes[mode][Outcome.OK] for mode in Mode},
        "throughput_rps": round(ok / seconds, 1) if seconds > 0 else None,
        "failed": {**failed, "total": sum(failed.values())},
        "outcomes": {mode.value: {o.value: recorder.outcomes[mode][o] for o in FAILURES}
                     for mode in Mode},
        "keepalive_retries": {"closed_idle": recorder.retries["closed_idle"],
                              "closed_before_response":
                                  recorder.retries["closed_before_response"]},
        "keepalive_server_closes": recorder.server_closes,
    }


def _swap_figures(recorder: Recorder, latencies: list[float | None]) -> dict[str, Any]:
    done = sorted(x * 1000 for x in latencies if x is not None)

    def ms(p: float) -> float | None:
        value = percentile(done, p)
        return round(value, 1) if value is not None else None

    per_swap = []
    for i, latency in enumerate(latencies, start=1):
        old, new = recorder.versions.get(f"v{i - 1}"), recorder.versions.get(f"v{i}")
        carried = None if old is None or new is None else new.min_count > old.max_count
        per_swap.append({"swap": i, "latency_ms": None if latency is None else
                         round(latency * 1000, 1),
                         "failed": recorder.failures_by_swap[i], "carried": carried})
    kept = sum(1 for s in per_swap if s["carried"])
    return {
        "swaps": len(latencies),
        "swaps_timed_out": sum(1 for x in latencies if x is None),
        "latency_ms": {"p50": ms(50), "p90": ms(90), "p99": ms(99), "max": ms(100)},
        "state": {
            "carried": kept,
            "lost": len(per_swap) - kept,
            "duplicate_counts": recorder.duplicate_counts,
            "every_swap": bool(per_swap) and kept == len(per_swap)
                          and recorder.duplicate_counts == 0,
        },
        "per_swap": per_swap,
    }


async def measure(variant: Variant, contenders: list[Contender], opts: Options, work: Path,
                  sessions: Sessions) -> dict[str, dict[str, Any]]:
    """Every contender with ``variant``: started one after the other, steady
    phase side by side, then each one's swap phase; all stopped at the end."""
    results: dict[str, dict[str, Any]] = {}
    servers: dict[str, Server] = {}
    try:
        for contender in contenders:
            missing = contender.missing()
            if missing:
                results[contender.name] = {"skipped": missing}
                continue
            print(f"{variant.name}: starting {contender.label}", file=sys.stderr, flush=True)
            server = contender.launch(work / contender.name, variant, sessions,
                                      opts.watch_quiet_ms)
            try:
                results[contender.name] = {"start_s": round(await wait_serving(server), 3)}
                servers[contender.name] = server
            except ContenderError as exc:
                results[contender.name] = _stopped(server, sessions, error=str(exc))
        if servers:
            print(f"{variant.name}: steady load, side by side", file=sys.stderr, flush=True)
            for name, figures in (await steady(servers, opts)).items():
                results[name]["steady"] = figures
        for name, server in servers.items():
            swaps = opts.swaps if name == "hotsup" else opts.peer_swaps
            if server.contender.reloads and swaps > 0:
                print(f"{variant.name}: {swaps} swaps of {server.contender.label}",
                      file=sys.stderr, flush=True)
                try:
                    results[name]["swapping"] = await swapping(server, variant, opts, swaps)
                except ContenderError as exc:
                    results[name]["error"] = str(exc)
    finally:
        for name, server in servers.items():
            results[name].update(_stopped(server, sessions))
    return results


def _stopped(server: Server, sessions: Sessions, **extra: Any) -> dict[str, Any]:
    """Stop ``server``: its exit status, and hotsup's notable log lines."""
    sessions.stop(server.proc)
    result = {**extra, "exit_status": server.proc.returncode}
    if server.contender.name == "hotsup":
        result["log_notable"] = notable_log_lines(server.log)
    return result


# -- comparison ----------------------------------------------------------------------


def _figure(result: dict[str, Any], *path: str) -> Any:
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


FIGURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # name: (path in a contender's result, peers it is compared with)
    "swap_p50_ms": (("swapping", "latency_ms", "p50"), SWAP_PEERS),
    "swap_p99_ms": (("swapping", "latency_ms", "p99"), SWAP_PEERS),
    "swap_failed_requests": (("swapping", "failed", "total"), SWAP_PEERS),
    "swap_state_carried": (("swapping", "state", "carried"), SWAP_PEERS),
    "steady_rps": (("steady", "throughput_rps"), THROUGHPUT_PEERS),
    "swapping_rps": (("swapping", "throughput_rps"), SWAP_PEERS),
    "start_s": (("start_s",), THROUGHPUT_PEERS),
}


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Each figure: hotsup's value, and each peer's value with hotsup/peer.

    ``steady_rps`` also gets ``paired_ratio``: the median over the steady
    rounds of hotsup's rate over the peer's in the same round. Two slices of
    one round are seconds apart, so on a machine whose load drifts this is
    the steadier figure, and the one the throughput target reads.
    """
    hotsup = results.get("hotsup", {})
    table: dict[str, Any] = {}
    for name, (path, peers) in FIGURES.items():
        mine = _figure(hotsup, *path)
        entry: dict[str, Any] = {"hotsup": mine}
        for peer in peers:
            if peer in results:
                theirs = _figure(results[peer], *path)
                entry[peer] = {"value": theirs, "ratio": ratio(mine, theirs)}
        table[name] = entry
    for peer, entry in table["steady_rps"].items():
        if peer != "hotsup":
            entry["paired_ratio"] = _paired_ratio(
                _figure(hotsup, "steady", "rounds_rps"),
                _figure(results[peer], "steady", "rounds_rps"))
    return table


def _paired_ratio(mine: list[float] | None, theirs: list[float] | None) -> float | None:
    if not mine or not theirs or len(mine) != len(theirs):
        return None
    ratios = [r for a, b in zip(mine, theirs, strict=True) if (r := ratio(a, b)) is not None]
    return round(statistics.median(ratios), 3) if ratios else None


def targets(variant: str, results: dict[str, dict[str, Any]],
            compared: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for hotsup: name, value, bound, pass (None: not measured)."""
    hot = results.get("hotsup", {})
    timed_out = _figure(hot, "swapping", "swaps_timed_out")
    all_seen = timed_out == 0
    rows: list[tuple[str, Any, str, bool | None]] = []

    def failed(mode: str) -> int | None:
        parts = [_figure(hot, phase, "failed", mode) for phase in ("steady", "swapping")]
        return None if None in parts else sum(parts)

    for mode, label in (("short_lived", "short-lived"), ("keep_alive", "keep-alive")):
        value = failed(mode)
        rows.append((f"0 failed requests, {label}", value, "== 0",
                     None if value is None else value == 0))
    for p, bound in (("p50", TARGETS["p50_ms"]), ("p99", TARGETS["p99_ms"])):
        value = _figure(hot, "swapping", "latency_ms", p)
        rows.append((f"swap latency {p} (ms, from the write)", value, f"<= {bound}",
                     None if value is None else value <= bound and all_seen))
    fraction = RELOAD_FRACTION[variant]
    value = _figure(compared, "swap_p50_ms", "uvicorn_reload", "ratio")
    rows.append(("swap p50 / uvicorn --reload's", value, f"<= {fraction:g}",
                 None if value is None else value <= fraction and all_seen))
    value = _figure(compared, "swap_p50_ms", "gunicorn_hup", "ratio")
    bound = TARGETS["p50_vs_gunicorn_hup"]
    rows.append(("swap p50 / gunicorn + HUP's", value, f"< {bound:g}",
                 None if value is None else value < bound and all_seen))
    value = _figure(compared, "steady_rps", "uvicorn", "paired_ratio")
    bound = TARGETS["throughput_vs_uvicorn"]
    rows.append(("steady throughput / plain uvicorn's (paired)", value, f">= {bound:g}",
                 None if value is None else value >= bound))
    state = _figure(hot, "swapping", "state")
    rows.append(("state carried across every swap",
                 None if state is None else f"{state['carried']}/{state['carried'] + state['lost']}"
                 f" dup={state['duplicate_counts']}", "all",
                 None if state is None else bool(state["every_swap"]) and all_seen))
    return [{"target": name, "value": value, "bound": bound_text, "pass": passed}
            for name, value, bound_text, passed in rows]


# -- report --------------------------------------------------------------------------


def _cell(value: Any, width: int) -> str:
    text = "-" if value is None else str(value)
    return f"{text:>{width}}"


def table(report: dict[str, Any]) -> str:
    out: list[str] = []
    head = (f"{'':22}{'start':>6}{'steady':>8}{'swapng':>8}{'swaps':>7}{'p50':>8}{'p90':>8}"
            f"{'p99':>8}{'max':>8}{'failed':>9}{'retry':>7}{'state':>7}")
    units = (f"{'':22}{'s':>6}{'req/s':>8}{'req/s':>8}{'(lost)':>7}{'ms':>8}{'ms':>8}"
             f"{'ms':>8}{'ms':>8}{'short/ka':>9}{'ka':>7}{'kept':>7}")
    for variant, section in report["apps"].items():
        out += [f"== app: {variant} ==", head, units]
        for name, result in section["contenders"].items():
            label = CONTENDERS[name].label
            if "skipped" in result or "error" in result:
                why = result.get("skipped") or result.get("error")
                out.append(f"{label:22}{'skipped' if 'skipped' in result else 'ERROR'}: "
                           f"{textwrap.shorten(str(why), 160)}")
                continue
            out.append(_row(label, result))
        out += [*_ratio_lines(section["compare"]), "targets (hotsup):"]
        for row in section["targets"]:
            verdict = {True: "PASS", False: "FAIL", None: "n/a "}[row["pass"]]
            out.append(f"  {verdict}  {row['target']:46} {_cell(row['value'], 14)}  "
                       f"{row['bound']}")
    out.append("steady = median req/s of the side-by-side rounds; swapng = req/s over the swap "
               "phase; failed = failed requests over both phases (short-lived/keep-alive); "
               "retry = keep-alive retries after the server closed an idle connection (RFC 9112 "
               "9.3.1), not failures; state kept = swaps whose counter carried over.")
    return "\n".join(out)


def _row(label: str, result: dict[str, Any]) -> str:
    steady, swapping = result.get("steady", {}), result.get("swapping")
    failed = {mode: sum(_figure(p, "failed", mode) or 0 for p in (steady, swapping or {}))
              for mode in ("short_lived", "keep_alive")}
    retries = sum(sum((_figure(p, "keepalive_retries") or {}).values())
                  for p in (steady, swapping or {}))
    cells = _cell(result.get("start_s"), 6) + _cell(steady.get("throughput_rps"), 8)
    if swapping is None:
        cells += _cell(None, 8) + _cell(None, 7) + "".join(_cell(None, 8) for _ in range(4))
        state = "-"
    else:
        lat = swapping["latency_ms"]
        cells += (_cell(swapping["throughput_rps"], 8)
                  + _cell(f"{swapping['swaps']}({swapping['swaps_timed_out']})", 7)
                  + "".join(_cell(lat[k], 8) for k in ("p50", "p90", "p99", "max")))
        state = f"{swapping['state']['carried']}/{swapping['swaps']}"
    failures = f"{failed['short_lived']}/{failed['keep_alive']}"
    return f"{label:22}{cells}{_cell(failures, 9)}{_cell(retries, 7)}{_cell(state, 7)}"


def _ratio_lines(compared: dict[str, Any]) -> list[str]:
    lines = []
    for peer in THROUGHPUT_PEERS:
        parts = [f"{name} {entry[peer]['ratio']}" for name, entry in compared.items()
                 if peer in entry and name not in ("swap_failed_requests", "swap_state_carried")]
        paired = _figure(compared, "steady_rps", peer, "paired_ratio")
        if paired is not None:
            parts.insert(0, f"steady_rps(paired) {paired}")
        if parts:
            lines.append(f"hotsup / {CONTENDERS[peer].label}: " + "  ".join(parts))
    return lines


# -- main ----------------------------------------------------------------------------


async def suite(variants: list[Variant], contenders: list[Contender], opts: Options,
                work: Path, sessions: Sessions) -> dict[str, Any]:
    apps: dict[str, Any] = {}
    for variant in variants:
        results = await measure(variant, contenders, opts, work / variant.name, sessions)
        compared = compare(results)
        apps[variant.name] = {"contenders": results, "compare": compared,
                              "targets": targets(variant.name, results, compared)}
    return apps


def _names(text: str, known: dict[str, Any], what: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(known)}")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--apps", default=",".join(VARIANTS),
                        type=lambda text: _names(text, VARIANTS, "app"),
                        help=f"comma-separated app variants (default {','.join(VARIANTS)})")
    parser.add_argument("--contenders", default=",".join(CONTENDERS),
                        type=lambda text: _names(text, CONTENDERS, "contender"),
                        help=f"comma-separated (default {','.join(CONTENDERS)})")
    parser.add_argument("--swaps", type=int, default=50, help="hotsup swaps per app (50)")
    parser.add_argument("--peer-swaps", type=int, default=10,
                        help="reloads per app for each peer (10)")
    parser.add_argument("--steady-seconds", type=float, default=5.0,
                        help="steady phase per contender and app, in seconds (5)")
    parser.add_argument("--steady-rounds", type=int, default=5,
                        help="rounds the steady phase alternates between contenders (5)")
    parser.add_argument("--short-clients", type=int, default=4,
                        help="short-lived clients, one request per connection (4)")
    parser.add_argument("--keepalive-clients", type=int, default=4,
                        help="keep-alive clients (4)")
    parser.add_argument("--request-timeout", type=float, default=5.0,
                        help="seconds before a request counts as timed out (5)")
    parser.add_argument("--watch-quiet-ms", type=int, default=30,
                        help="hotsup's watch_quiet_ms (30)")
    parser.add_argument("--json-only", action="store_true", help="no table on stderr")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs, apps, server logs)")
    args = parser.parse_args(argv)
    for name in ("swaps", "peer_swaps", "short_clients", "keepalive_clients"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be at least 0")
    if args.short_clients + args.keepalive_clients == 0:
        parser.error("--short-clients and --keepalive-clients are both 0: no load")
    if min(args.steady_seconds, args.steady_rounds, args.request_timeout,
           args.watch_quiet_ms) <= 0:
        parser.error("--steady-seconds, --steady-rounds, --request-timeout and "
                     "--watch-quiet-ms must be > 0")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM becomes Ctrl-C: asyncio.Runner turns SIGINT into a cancellation
    # of the suite, whose clean-up then runs as for Ctrl-C.
    signal.raise_signal(signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = Options(args.swaps, args.peer_swaps, args.steady_seconds, args.steady_rounds,
                   args.short_clients, args.keepalive_clients, args.request_timeout,
                   args.watch_quiet_ms)
    variants = [VARIANTS[name] for name in args.apps]
    contenders = [CONTENDERS[name] for name in args.contenders]
    signal.signal(signal.SIGTERM, _terminate)
    work = Path(tempfile.mkdtemp(prefix="hotsup-asgi-bench-"))
    started = time.monotonic()
    try:
        with Sessions() as sessions, asyncio.Runner(loop_factory=uvloop.new_event_loop) as run:
            apps = run.run(suite(variants, contenders, opts, work, sessions))
    except KeyboardInterrupt:
        print("interrupted: every server the bench started is stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "asgi_swap",
        "params": {**vars(opts), "apps": args.apps, "contenders": args.contenders,
                   "swap_deadline_s": SWAP_DEADLINE},
        "apps": apps,
        "targets": TARGETS,
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine(),
    }
    print(json.dumps(report))
    if not args.json_only:
        print(table(report), file=sys.stderr)
        for variant, section in apps.items():
            notable = section["contenders"].get("hotsup", {}).get("log_notable")
            if notable:
                print(f"hotsup log ({variant}), errors and warnings:", file=sys.stderr)
                print(textwrap.indent("\n".join(notable), "  "), file=sys.stderr)
    errors = [r for section in apps.values() for r in section["contenders"].values()
              if "error" in r]
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
