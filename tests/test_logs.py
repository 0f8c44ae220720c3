"""Logs of a bundle's own helper processes, through multiprocessing-logging."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable

import pytest
from harness import Hotsup, wait_for

pytestmark = pytest.mark.timeout(60)

MakeHotsup = Callable[..., Hotsup]

#: A bundle whose start() runs a multiprocessing.Pool. The helpers' own
#: stdout and stderr go to /dev/null, so their records can reach the log only
#: through the worker (multiprocessing-logging's queue), and they are large
#: enough (30 kB, over PIPE_BUF) to interleave if several processes wrote
#: them to one pipe at once.
POOL_BUNDLE = textwrap.dedent("""\
    import logging
    import multiprocessing
    import os

    def silence():
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)

    def work(i):
        logging.getLogger("helper").info("helper %d: %s", i, chr(ord("a") + i) * 30000)
        return os.getpid()

    class App:
        def __init__(self, ctx):
            self.ctx = ctx

        async def start(self):
            pool = multiprocessing.Pool(4, initializer=silence)
            pids = pool.map(work, range(8))
            pool.close()
            pool.join()
            self.ctx.log.info("pool done in %d helper(s)", len(set(pids) - {os.getpid()}))
    """)


def test_pool_helpers_records_reach_hotsup_logs_whole_and_tagged(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    bundle = sup.bundles / "pool"
    bundle.mkdir()
    (bundle / "bundle.toml").write_text('entry = "pool:App"\nmultiprocessing_logging = true\n')
    (bundle / "pool.py").write_text(POOL_BUNDLE)
    sup.start_serving("pool")

    def helper_records() -> list[dict[str, object]]:
        done = sup.cli("logs", "pool", "--json", "-n", "1000")
        assert done.returncode == 0, done.stderr
        records = [json.loads(line) for line in done.stdout.splitlines()]
        return [r for r in records if str(r["msg"]).startswith("helper ")]

    records = wait_for(lambda: len(helper_records()) >= 8 and helper_records(),
                       what="eight helper records")
    assert isinstance(records, list)
    by_index = {}
    for record in records:
        assert (record["tag"], record["bundle"], record["generation"]) == ("pool@1", "pool", 1)
        index = int(str(record["msg"]).split(":")[0].removeprefix("helper "))
        assert record["msg"] == f"helper {index}: " + chr(ord("a") + index) * 30000, \
            "a record arrived whole, not interleaved with another"
        by_index[index] = record
    assert sorted(by_index) == list(range(8))
    assert "pool done in " in sup.cli("logs", "pool").stdout
