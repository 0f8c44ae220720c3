"""Workers and the zygote: logs, sockets, stop(), crashes, preloading."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import (
    Hotsup,
    Load,
    counter_source,
    free_port,
    idle_client,
    port_open,
    request,
    save,
    serve_counter,
    wait_for,
    write_bundle,
)

pytestmark = pytest.mark.timeout(120)

MakeHotsup = Callable[..., Hotsup]


def pid_of(sup: Hotsup, tag: str) -> int:
    return int(sup.wait_log(rf"{re.escape(tag)}: serving \(pid (\d+)\)"))


def test_logs_prints_and_tracebacks_are_tagged(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = free_port()
    write_bundle(sup.bundles / "talker", counter_source("v0", start=(
        "print('printed line'); self.ctx.log.warning('logged %s', 42); "
        "import logging; logging.getLogger('mine').error('from a module logger'); "
        "self.ctx.log.info('generation %d', self.ctx.generation)"),
        tail="\nprint('at import')\n"), port, module="talker")
    sup.start_serving("talker")
    sup.wait_log(r"OUTPUT\s+talker@1: printed line")
    sup.wait_log(r"OUTPUT\s+talker@1: at import")
    sup.wait_log(r"WARNING\s+talker@1: logged 42")
    sup.wait_log(r"ERROR\s+talker@1: from a module logger")
    sup.wait_log(r"INFO\s+talker@1: generation 1")
    # a traceback of a failing successor arrives whole, every line tagged
    save(sup.bundles / "talker" / "talker.py",
         counter_source("v1", init="raise KeyError('missing-key')"))
    sup.wait_log(r"talker@2: .*KeyError: 'missing-key'")
    lines = [line for line in sup.log().splitlines() if "talker@2" in line]
    assert any("Traceback (most recent call last)" in line for line in lines)
    assert all(re.match(r"\d\d:\d\d:\d\d\.\d{3} \w+\s+(hotsup|talker@2): ", line)
               for line in lines), lines
    assert sup.stop() == 0


def test_stop_is_called_at_retirement(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = free_port()
    marker = sup.root / "stopped"
    stop_hook = f"\n    async def stop(self):\n        open({str(marker)!r}, 'a').write(" \
                "f'{self.ctx.generation}\\n')\n"
    source = counter_source("v0").replace("\n    async def start(self):",
                                          stop_hook + "\n    async def start(self):")
    write_bundle(sup.bundles / "counter", source, port)
    sup.start_serving("counter")
    save(sup.bundles / "counter" / "counter.py", source.replace("'v0'", "'v1'"))
    sup.wait_log(r"counter@1: retired")
    assert marker.read_text() == "1\n"
    assert sup.stop() == 0
    assert marker.read_text() == "1\n2\n"


def test_unix_socket_bundle(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    bundle = sup.bundles / "local"
    bundle.mkdir()
    (bundle / "local.py").write_text(counter_source("v0"))
    path = sup.root / "local.sock"
    (bundle / "bundle.toml").write_text(
        f'entry = "local:Counter"\n[sockets.main]\nbind = "unix:{path}"\n')
    sup.start_serving("local")

    def ask() -> str:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(b"incr\n")
            return sock.recv(100).decode().strip()

    assert ask().startswith("count=1 generation=1")
    save(bundle / "local.py", counter_source("v1"))
    sup.wait_log(r"local@2: swapped")
    assert ask() == "count=2 generation=2 tag=v1"
    assert sup.stop() == 0
    assert not path.exists()


def test_changing_the_bind_address_moves_the_bundle(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    old, new = free_port(), free_port()
    bundle = write_bundle(sup.bundles / "counter", counter_source("v0"), old)
    sup.start_serving("counter")
    assert request(old).startswith("count=1")
    manifest = bundle / "bundle.toml"
    save(manifest, manifest.read_text().replace(str(old), str(new)))
    sup.wait_log(r"counter@2: swapped")
    assert request(new).startswith("count=2 generation=2")
    wait_for(lambda: not port_open(old), 10.0, "the old port to close")
    assert sup.stop() == 0


def test_an_idle_client_delays_a_hand_over_but_does_not_block_it(hotsup: MakeHotsup) -> None:
    sup = hotsup("[defaults]\nquiesce_timeout = 0.5\n")
    port = serve_counter(sup)
    with idle_client(port):
        save(sup.bundles / "counter" / "counter.py", counter_source("v1"))
        line = sup.wait_log(r"swap to counter@2 rolled back, counter@1 keeps serving: .*")
        assert "1 connection(s) still in flight after 0.5s; trying again in 2s" in line, line
        assert request(port).startswith("count=1 generation=1")
    sup.wait_log(r"counter@\d: swapped from counter@1")
    assert request(port) == "count=2 generation=3 tag=v1"
    assert sup.stop() == 0


def test_a_renamed_bundle_carries_its_state_and_port_over(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = free_port()
    write_bundle(sup.bundles / "old", counter_source("v0"), port)
    sup.start_serving("old")
    with Load(port, clients=2) as load:
        before = load.wait_reply(lambda r: r.count > 5)
        os.rename(sup.bundles / "old", sup.bundles / "new")
        sup.wait_log(r"new: renamed from old; its generation, state and sockets carry over")
        sup.wait_log(r"new@2: swapped from old@1")
        served = time.monotonic()
        after = load.wait_reply(lambda r: r.generation == 2, after=served)
        assert after.count > before.count, "the count goes on: the state came along"
    assert not load.failures, load.failures[:3]
    load.assert_consistent()
    status = sup.status()
    assert list(status) == ["new"] and status["new"]["generation"] == 2
    assert sup.stop() == 0


def test_a_declared_bundle_whose_directory_is_replaced_is_still_watched(
    hotsup: MakeHotsup,
) -> None:
    sup = hotsup()
    port = free_port()
    api = write_bundle(sup.root / "svc" / "api", counter_source("v0"), port)
    with sup.config.open("a") as config:
        config.write('\n[bundles.api]\npath = "svc/api"\n')
    sup.start_serving("api")
    staged = sup.root / "staged-api"
    shutil.copytree(api, staged)
    shutil.rmtree(api)
    shutil.copytree(staged, api)  # the same content again: nothing to swap
    assert request(port).endswith("tag=v0")
    # the watch on svc/api died with the old directory; it must come back
    sup.wait_log(r"watching .*svc/api again")
    save(api / "counter.py", counter_source("v1"))
    sup.wait_log(r"api@2: swapped")
    assert request(port).endswith("tag=v1")
    assert sup.stop() == 0


def test_a_killed_worker_is_restarted(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = free_port()
    write_bundle(sup.bundles / "counter", counter_source("v0"), port)
    sup.start()
    with Load(port, clients=2) as load:
        load.wait_reply(lambda r: True)
        os.kill(pid_of(sup, "counter@1"), signal.SIGKILL)
        sup.wait_log(r"counter@1 was killed by SIGKILL while serving; restarting")
        load.wait_reply(lambda r: r.generation == 2)
    assert sup.stop() == 0


def test_a_killed_zygote_is_replaced_and_workers_live_on(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = free_port()
    write_bundle(sup.bundles / "counter", counter_source("v0"), port)
    sup.start()
    zygote = int(sup.wait_log(r"zygote (\d+) ready"))
    sup.wait_log(r"counter@1: serving")
    os.kill(zygote, signal.SIGKILL)
    sup.wait_log(r"the zygote exited")
    assert request(port).startswith("count=1 generation=1")  # the worker did not care
    save(sup.bundles / "counter" / "counter.py", counter_source("v1"))
    sup.wait_log(r"counter@2: swapped")
    assert request(port) == "count=2 generation=2 tag=v1"
    assert sup.stop() == 0


def test_preloaded_modules_are_imported_once_in_the_zygote(hotsup: MakeHotsup,
                                                           tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "heavy.py").write_text("import os\nLOADED_IN = os.getpid()\n")
    sup = hotsup('preload = ["heavy"]\n')
    # preload is a [supervisor] key: the fixture's config ends inside [supervisor]
    port = free_port()
    source = counter_source("v0").replace(
        "gen = self.ctx.generation", "import heavy, os; gen = (heavy.LOADED_IN, os.getppid())")
    write_bundle(sup.bundles / "counter", source, port)
    sup.start(env=dict(os.environ, PYTHONPATH=str(lib)))
    zygote = int(sup.wait_log(r"zygote (\d+) ready"))
    sup.wait_log(r"counter@1: serving")
    assert f"generation=({zygote}, {zygote})" in request(port)
    assert sup.stop() == 0


def test_a_bundle_module_shadowed_by_the_runtime_is_refused(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    bundle = write_bundle(sup.bundles / "tk", counter_source("v0", tail="import token\n"),
                          free_port(), module="app")
    (bundle / "token.py").write_text("MINE = True\n")
    sup.start()
    line = sup.wait_log(r"tk: tk@1 did not start: .*")
    assert "tk/token.py is shadowed by the module 'token'" in line, line
    assert sup.stop() == 0


def test_processes_a_bundle_runs_do_not_hold_its_sockets(hotsup: MakeHotsup) -> None:
    """A helper that escapes the worker's process group, started with close_fds=False."""
    sup = hotsup()
    port = free_port()
    helper = sup.root / "helper.pid"
    start = (f"import subprocess; h = subprocess.Popen(['sleep', '60'], close_fds=False, "
             f"start_new_session=True); open({str(helper)!r}, 'w').write(str(h.pid))")
    write_bundle(sup.bundles / "counter", counter_source("v0", start=start), port)
    sup.start_serving("counter")
    helper_pid = int(str(wait_for(lambda: helper.exists() and helper.read_text(), 5.0)))
    try:
        shutil.rmtree(sup.bundles / "counter")
        sup.wait_log(r"counter@1: retired")
        wait_for(lambda: not port_open(port), 10.0, "the port to close")
    finally:
        os.kill(helper_pid, signal.SIGKILL)  # ours: it escaped the worker's group on purpose
    assert sup.stop() == 0


def test_a_preloaded_module_inside_a_bundle_is_a_config_error(hotsup: MakeHotsup) -> None:
    sup = hotsup('preload = ["counter"]\n')
    write_bundle(sup.bundles / "counter", counter_source("v0"), free_port())
    sup.start()
    assert sup.proc is not None and sup.proc.wait(30) == 2
    assert "config.toml: supervisor.preload: 'counter' lives in bundle 'counter'" in sup.log()


def test_a_drop_in_holding_a_preloaded_module_is_refused(hotsup: MakeHotsup,
                                                         tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "heavy.py").write_text("X = 1\n")
    sup = hotsup('preload = ["heavy"]\n')
    good = free_port()
    write_bundle(sup.bundles / "good", counter_source("g"), good, module="good")
    sup.start(env=dict(os.environ, PYTHONPATH=str(lib)))
    sup.wait_log(r"good@1: serving")
    staged = write_bundle(sup.root / "staging" / "sneaky", counter_source("s"), free_port(),
                          module="heavy")
    (sup.bundles / "sneaky").mkdir()
    for name in ("heavy.py", "bundle.toml"):  # code first, then the manifest that makes it a bundle
        (sup.bundles / "sneaky" / name).write_bytes((staged / name).read_bytes())
    line = sup.wait_log(r"sneaky: cannot load the bundle: .*")
    assert "supervisor.preload: 'heavy' lives in bundle 'sneaky'" in line, line
    assert request(good).endswith("tag=g")
    assert sup.stop() == 0



def test_a_changed_preloaded_package_replaces_the_zygote_without_a_failed_request(
        hotsup: MakeHotsup, tmp_path: Path) -> None:
    lib = tmp_path / "lib" / "heavy"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text('VERSION = "v0"\n')
    sup = hotsup('preload = ["heavy"]\n[defaults]\nprobation = 0.5\n')
    port = free_port()
    source = counter_source("unused").replace("TAG = 'unused'", "from heavy import VERSION as TAG")
    write_bundle(sup.bundles / "counter", source, port)
    sup.start(env=dict(os.environ, PYTHONPATH=str(lib.parent)))
    first = int(sup.wait_log(r"zygote (\d+) ready"))
    sup.wait_log(r"counter@1: serving")
    with Load(port, clients=4) as load:
        load.wait_reply(lambda r: r.tag == "v0")
        save(lib / "__init__.py", 'VERSION = "v1"\n')  # what a pip upgrade does to it
        line = sup.wait_log(r"zygote \d+ replaces zygote \d+")
        load.wait_reply(lambda r: r.tag == "v1")
    load.assert_consistent()
    assert line == f"zygote {line.split()[1]} replaces zygote {first}"
    wait_for(lambda: first not in sup.leftovers(), what="the old zygote, once its workers went")
    assert sup.stop() == 0


def test_a_broken_preloaded_package_keeps_the_running_code(hotsup: MakeHotsup,
                                                           tmp_path: Path) -> None:
    lib = tmp_path / "lib" / "heavy"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text('VERSION = "v0"\n')
    sup = hotsup('preload = ["heavy"]\n')
    port = free_port()
    source = counter_source("unused").replace("TAG = 'unused'", "from heavy import VERSION as TAG")
    write_bundle(sup.bundles / "counter", source, port)
    sup.start(env=dict(os.environ, PYTHONPATH=str(lib.parent)))
    sup.wait_log(r"counter@1: serving")
    save(lib / "__init__.py", 'VERSION = "v1"\nraise ImportError("half installed")\n')
    line = sup.wait_log(r"the new zygote failed: .*")
    assert "cannot preload 'heavy': ImportError: half installed" in line, line
    assert request(port).endswith("generation=1 tag=v0"), "the old code serves on"
    save(lib / "__init__.py", 'VERSION = "v2"\n')  # the upgrade finished
    sup.wait_log(r"counter@2: swapped from counter@1")
    assert request(port).endswith("generation=2 tag=v2")
    assert sup.stop() == 0


def test_the_zygote_keeps_a_spare_forked_and_names_its_children(hotsup: MakeHotsup) -> None:
    sup = hotsup("[defaults]\nprobation = 0\n")
    port = free_port()
    write_bundle(sup.bundles / "counter", counter_source("v0"), port)
    sup.start()
    zygote = int(sup.wait_log(r"zygote (\d+) ready"))
    sup.wait_log(r"counter@1: serving")

    def children() -> list[str]:
        names = []
        for pid in sup.leftovers():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == zygote:
                    names.append(stat[stat.index("(") + 1:stat.rindex(")")])
        return sorted(names)

    wait_for(lambda: children() == ["counter@1", "hotsup-spare"], what="a worker and a spare")
    save(sup.bundles / "counter" / "counter.py", counter_source("v1"))
    sup.wait_log(r"counter@2: swapped from counter@1")
    assert request(port).endswith("generation=2 tag=v1"), "the spare became counter@2"
    wait_for(lambda: children() == ["counter@2", "hotsup-spare"], what="a new spare")
    assert sup.stop() == 0
    assert sup.leftovers() == [], "the spare went with the zygote"
