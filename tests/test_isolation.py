"""Isolation (issue 11): what a worker holds, what a bundle can reach, what
outlives a worker. Real supervisors, real workers, real /proc."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import resource
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import uvloop
from harness import (
    FIND_CHANNEL,
    Hotsup,
    counter_source,
    free_port,
    port_open,
    request,
    save,
    wait_for,
    write_bundle,
)
from hotsup.worker.listener import StreamsListener

MakeHotsup = Callable[..., Hotsup]


def _fd_targets(pid: int) -> dict[int, str]:
    targets = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            targets[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return targets


def _inodes(pid: int) -> set[str]:
    """The sockets and pipes ``pid`` holds, by inode."""
    return {t for t in _fd_targets(pid).values() if t.startswith(("socket:", "pipe:"))}


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if _ppid(int(entry)) == pid:
                    found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return found


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as comm:
        return comm.read().strip()


def _memory_holds(pid: int, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the readable memory of ``pid`` (as root)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or "[vvar" in line or "[vsyscall" in line:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except OSError:
                continue
    return False


def _pids(sup: Hotsup) -> dict[str, int]:
    """bundle@generation -> pid of every worker of this supervisor's zygote,
    and "spare" for the spare child."""
    found: dict[str, int] = {}
    for zygote in _children(sup.pid):
        for child in _children(zygote):
            found[_comm(child)] = child
    return found


def _uid(pid: int) -> int:
    return os.stat(f"/proc/{pid}").st_uid


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="reads other processes' memory "
                                "and fds: needs root")


@needs_root
def test_no_child_holds_another_generations_fds_or_spec(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    secret = "s3cr3t-" + os.urandom(8).hex()
    write_bundle(sup.bundles / "alpha", counter_source("a1"), free_port())
    write_bundle(sup.bundles / "beta", counter_source("b1"), free_port(),
                 extra=f'[settings]\napi_key = "{secret}"\n')
    sup.start()
    sup.wait_log(r"alpha@1: serving")
    sup.wait_log(r"beta@1: serving")
    # alpha@2 is forked after beta's spawn: from the spare that waited then.
    save(sup.bundles / "alpha" / "counter.py", counter_source("a2"))
    sup.wait_log(r"alpha@1: retired")
    pids = wait_for(lambda: (lambda p: p if {"alpha@2", "beta@1", "hotsup-spare"} <= set(p)
                             else None)(_pids(sup)), what="alpha@2, beta@1 and a spare")
    assert isinstance(pids, dict)
    alpha, beta, spare = pids["alpha@2"], pids["beta@1"], pids["hotsup-spare"]
    zygote = _ppid(alpha)
    shared = _inodes(alpha) & _inodes(beta)
    assert len(shared) == 1 and shared <= _inodes(zygote), \
        f"two bundles' workers share only the lifeline, not {shared}"
    assert not (_inodes(spare) - _inodes(zygote)) & (_inodes(alpha) | _inodes(beta)), \
        "the spare holds no worker's fd"
    assert not (_inodes(spare) - _inodes(zygote)) & _inodes(sup.pid), \
        "the spare holds nothing that reaches the supervisor"
    # What a worker shares with the supervisor: its listening socket, its log
    # pipe (stdout and stderr) and the lifeline; its channel end is its own.
    fds = _fd_targets(alpha)
    assert fds[1] == fds[2] and fds[1].startswith("pipe:")
    with_supervisor = _inodes(alpha) & _inodes(sup.pid)
    assert len(with_supervisor) == 3 and fds[1] in with_supervisor, with_supervisor
    assert sum(t.startswith("socket:") for t in with_supervisor) == 1
    # The spec (with its secret) went over beta's channel only.
    assert not _memory_holds(zygote, secret.encode()), "the zygote never sees a spec"
    assert not _memory_holds(spare, secret.encode())
    assert not _memory_holds(alpha, secret.encode())
    assert _memory_holds(beta, secret.encode()), "the check would see it"


FLOOD = FIND_CHANNEL + """

def go():
    sock = channel()
    sock.setblocking(True)
    big = os.memfd_create("big", os.MFD_ALLOW_SEALING)
    os.ftruncate(big, 300 << 20)
    fcntl.fcntl(big, fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    socket.send_fds(sock, [b'{"v":1,"op":"reply","id":1,"ok":true,"payload":%d}' % (300 << 20)],
                    [big])
    for i in range(5000):
        sock.send(b"garbage %d" % i)
    print("flooded", flush=True)
"""


def test_garbage_from_a_worker_is_dropped_and_logged_a_few_times(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = free_port()
    bundle = write_bundle(sup.bundles / "counter",
                          counter_source("v0", start="__import__('flood').go()"), port)
    (bundle / "flood.py").write_text(FLOOD)
    sup.start()
    sup.wait_log(r"counter@1: serving")
    sup.wait_log(r"flooded")
    sup.wait_log(r"over the limit of 268435456")
    assert request(port, "incr").startswith("count=1 generation=1")
    drops = re.findall(r"dropped a malformed message", sup.log())
    assert 1 <= len(drops) <= 5, len(drops)
    done = sup.cli("status", "--json")
    assert done.returncode == 0 and '"generation": 1' in done.stdout


STUBBORN_CHILD = """
import os, signal, time

def fork(path):
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(1)
    with open(path, "w") as out:
        out.write(str(pid))
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_crashed_workers_children_die_with_it(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = free_port()
    marker = sup.root / "child.pid"
    tail = ("\n\nimport os\n_handle = Counter.handle\n"
            "async def handle(self, reader, writer):\n"
            f"    if self.ctx.generation == 1 and not os.path.exists({str(marker)!r}):\n"
            f"        __import__('stubborn').fork({str(marker)!r})\n"
            "        os._exit(3)\n"
            "    await _handle(self, reader, writer)\n"
            "Counter.handle = handle\n")
    bundle = write_bundle(sup.bundles / "counter", counter_source("v0", tail=tail), port)
    (bundle / "stubborn.py").write_text(STUBBORN_CHILD)
    sup.start()
    sup.wait_log(r"counter@1: serving")
    with contextlib.suppress(ConnectionError):  # forks the child, then crashes: no answer
        assert request(port, "incr", timeout=5) == ""
    child = int(str(wait_for(lambda: marker.exists() and marker.read_text(), what="child pid")))
    wait_for(lambda: not _alive(child), what=f"the crashed worker's child {child} killed")
    sup.wait_log(r"counter@2: serving")
    assert request(port, "get").startswith("count=0 generation=2")
    shutil.rmtree(bundle)
    sup.wait_log(r"counter@2: retired")
    wait_for(lambda: not port_open(port), what="the port closed")


def test_ctx_sockets_cannot_harm_the_listening_socket(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = free_port()
    start = ("s = self.ctx.sockets['main']\n"
             "        try:\n"
             "            s.shutdown(__import__('socket').SHUT_RDWR)\n"
             "        except OSError as exc:\n"
             "            print('shutdown refused:', exc.errno, flush=True)\n"
             "        s.listen(1)\n"
             "        s.close()")
    write_bundle(sup.bundles / "counter", counter_source("v0", start=start), port)
    sup.start()
    sup.wait_log(rf"shutdown refused: {errno.EPERM}")
    sup.wait_log(r"counter@1: serving")
    assert request(port, "incr").startswith("count=1 generation=1")
    save(sup.bundles / "counter" / "counter.py", counter_source("v1", start=start))
    sup.wait_log(r"counter@2: swapped")
    assert request(port, "incr").startswith("count=2 generation=2 tag=v1")
    # listen(1) kept the shared backlog: many queued connections all get in.
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    for client in clients:
        client.sendall(b"get\n")
        assert client.recv(100).startswith(b"count=2")
        client.close()


def test_the_accept_loop_stops_on_a_socket_that_cannot_accept() -> None:
    """A listening fd closed under the listener (or shut down) fails accept()
    for ever; the reader must not fire again and again on it."""
    records: list[logging.LogRecord] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("t-accept")
    log.addHandler(Catch())

    async def main() -> None:
        server = socket.create_server(("127.0.0.1", 0))
        server.setblocking(False)
        port = server.getsockname()[1]

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        listener = StreamsListener("main", server, serve, log)
        server.shutdown(socket.SHUT_RDWR)  # what finding 6's bundle did: accept() -> EINVAL
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        for _ in range(50):
            await asyncio.sleep(0.005)
        client.close()
        listener.close()

    uvloop.run(main())
    errors = [r for r in records if "cannot accept any more" in r.getMessage()]
    assert len(errors) <= 1, [r.getMessage() for r in records]
    assert len(records) <= 1, "no retry storm"


def test_a_worker_of_another_bundle_is_not_in_reach(hotsup: MakeHotsup, tmp_path: Path) -> None:
    """No socket file to find: run_dir holds the control socket only."""
    sup = hotsup()
    write_bundle(sup.bundles / "counter", counter_source("v0"), free_port())
    sup.start()
    sup.wait_log(r"counter@1: serving")
    names = sorted(p.name for p in (sup.root / ".hotsup").iterdir())
    assert "workers" not in names, names


# -- run_dir (finding 1) ------------------------------------------------------------

def _nobody() -> int | None:
    import pwd

    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return None


def _as_user(uid: int, action: Callable[[], None]) -> None:
    """Run ``action`` (system calls only) in a child that dropped to ``uid``."""
    pid = os.fork()
    if pid == 0:  # the child: drop, act, _exit
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            action()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _start_with_run_dir(hotsup: MakeHotsup, run_dir: Path) -> Hotsup:
    sup = hotsup()
    write_bundle(sup.bundles / "counter", counter_source("v0"), free_port())
    sup.config.write_text(sup.config.read_text().replace(
        'run_dir = ".hotsup"', f'run_dir = "{run_dir}"'))
    sup.start()
    assert sup.proc is not None and sup.proc.wait(30) == 2, sup.log()
    return sup


@pytest.mark.skipif(_nobody() is None, reason="needs root and a 'nobody' user to test as")
def test_another_users_symlink_for_run_dir_is_refused(hotsup: MakeHotsup) -> None:
    """Finding 1: another user makes run_dir, in a 1777 directory, a symlink
    to a root-owned 0755 directory. hotsup must not chmod it or write there."""
    nobody = _nobody()
    assert nobody is not None
    shared = Path(tempfile.mkdtemp(prefix="hs-shared-", dir="/tmp"))
    target = Path(tempfile.mkdtemp(prefix="hs-target-", dir="/tmp"))
    try:
        os.chmod(shared, 0o1777)
        os.chmod(target, 0o755)
        _as_user(nobody, lambda: os.symlink(target, shared / "run"))
        _as_user(nobody, lambda: os.symlink(target, shared / "link"))
        sup = _start_with_run_dir(hotsup, shared / "run")
        assert f"run_dir {shared / 'run'} is a symlink" in sup.log()
        sup = _start_with_run_dir(hotsup, shared / "link" / "run")
        assert (f"{shared / 'link'} is a symlink owned by uid {nobody}, neither us nor root"
                in sup.log())
        assert stat.S_IMODE(target.stat().st_mode) == 0o755, "not chmodded"
        assert list(target.iterdir()) == [], "nothing written there"
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)


def test_a_run_dir_under_a_directory_others_can_write_is_refused(hotsup: MakeHotsup) -> None:
    open_dir = Path(tempfile.mkdtemp(prefix="hs-open-", dir="/tmp"))
    try:
        os.chmod(open_dir, 0o777)  # no sticky bit: anyone may rename what is in it
        sup = _start_with_run_dir(hotsup, open_dir / "sub" / "run")
        assert (f"run_dir {open_dir / 'sub' / 'run'}: {open_dir} is writable by others "
                f"(mode 777) without the sticky bit" in sup.log()), sup.log()
        assert not (open_dir / "sub").exists()
        os.chmod(open_dir, 0o1777)  # /tmp's mode: fine
        sup = hotsup()
        write_bundle(sup.bundles / "counter", counter_source("v0"), free_port())
        sup.config.write_text(sup.config.read_text().replace(
            'run_dir = ".hotsup"', f'run_dir = "{open_dir / "run"}"'))
        sup.start()
        sup.wait_log(r"counter@1: serving")
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)


# -- descriptors (finding 3) ---------------------------------------------------------

def _start_with_limit(sup: Hotsup, soft: int, hard: int) -> None:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    with sup.log_path.open("ab") as log:
        sup.proc = subprocess.Popen(
            [sys.executable, "-m", "hotsup.supervisor.cli", "start", str(sup.config)],
            cwd=sup.root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=limit)


def test_a_flood_of_control_connections_cannot_take_the_supervisor_down(
        hotsup: MakeHotsup) -> None:
    """Finding 3: at ulimit -n 256, idle connections to the control socket made
    libzmq abort the supervisor. Now only the control endpoint's own process
    can die of it, and a new one takes its place."""
    sup = hotsup()
    port, other = free_port(), free_port()
    write_bundle(sup.bundles / "counter", counter_source("v0"), port)
    write_bundle(sup.bundles / "other", counter_source("o0"), other)
    limit = 256
    _start_with_limit(sup, limit, limit)
    sup.wait_log(r"counter@1: serving")
    sup.wait_log(r"other@1: serving")
    control = str(sup.root / ".hotsup" / "control")
    clients: list[socket.socket] = []
    try:
        for _ in range(limit + 200):  # more than ulimit -n allows
            client = socket.socket(socket.AF_UNIX)
            try:
                client.connect(control)
            except OSError:  # between two endpoint processes
                client.close()
                continue
            clients.append(client)
        sup.wait_log(r"control: the control endpoint process exited \(killed by SIGABRT\)")
        assert sup.proc is not None and sup.proc.poll() is None, "the supervisor survived"
        assert request(port, "incr").startswith("count=1 generation=1"), "the bundles serve"
        assert request(other, "incr").startswith("count=1 generation=1")
        save(sup.bundles / "counter" / "counter.py", counter_source("v1"))
        sup.wait_log(r"counter@2: swapped")
    finally:
        for client in clients:
            client.close()
    sup.wait_log(r"control: listening again")
    done = wait_for(lambda: (lambda d: d if d.returncode == 0 else None)(
        sup.cli("status", "--json")), what="status answered")
    assert '"generation": 2' in str(getattr(done, "stdout", ""))
    assert request(port, "get").startswith("count=1 generation=2")
    assert sup.stop() == 0


def test_the_supervisor_raises_its_descriptor_limit(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    write_bundle(sup.bundles / "counter", counter_source("v0"), free_port())
    _start_with_limit(sup, 256, 4096)
    sup.wait_log(r"counter@1: serving")
    assert resource.prlimit(sup.pid, resource.RLIMIT_NOFILE) == (4096, 4096)
    pids = wait_for(lambda: _pids(sup).get("counter@1"), what="the worker")
    assert isinstance(pids, int)
    assert resource.prlimit(pids, resource.RLIMIT_NOFILE) == (4096, 4096), "inherited"


# -- per-bundle users (user = "NAME") ------------------------------------------------

PROBE = """
import json, os, signal, socket, time

def _comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return None

def probe(run_dir):
    found = {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
             "groups": os.getgroups()}
    def attempt(name, action):
        try:
            action()
            found[name] = "allowed"
        except OSError as exc:
            found[name] = type(exc).__name__
    attempt("list run_dir", lambda: os.listdir(run_dir))
    attempt("read key", lambda: open(os.path.join(run_dir, "checkpoints", "key"), "rb").read())
    def connect():
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(os.path.join(run_dir, "control"))
    attempt("connect control", connect)
    # The victim starts beside this bundle: wait for it to name itself.
    deadline = time.monotonic() + 10
    victims = []
    while not victims and time.monotonic() < deadline:
        victims = [int(p) for p in os.listdir("/proc") if p.isdigit()
                   and _comm(p) == "victim@1"]
        time.sleep(0.01)
    attempt("signal victim", lambda: os.kill(victims[0], signal.SIGTERM))
    attempt("write bundle dir", lambda: open(os.path.join(os.path.dirname(__file__), "x"), "w"))
    print("probe:", json.dumps(found), flush=True)
"""


@pytest.fixture
def world_readable() -> Iterator[Path]:
    """A directory every user may read (pytest's tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="hs-bundles-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(_nobody() is None, reason="needs root and a 'nobody' user to test as")
def test_a_bundle_with_its_own_user_cannot_reach_the_supervisor_or_others(
        hotsup: MakeHotsup, world_readable: Path) -> None:
    nobody = _nobody()
    sup = hotsup()
    victim_port, port = free_port(), free_port()
    write_bundle(sup.bundles / "victim", counter_source("v0"), victim_port)
    probe = f"__import__('probe').probe({str(sup.root / '.hotsup')!r})"
    evil = write_bundle(world_readable / "evil", counter_source("e0", start=probe), port)
    (evil / "probe.py").write_text(PROBE)
    for path in evil.iterdir():
        os.chmod(path, 0o644)
    os.chmod(evil, 0o755)
    sup.config.write_text(sup.config.read_text() + f'\n[bundles.evil]\npath = "{evil}"\n'
                          'user = "nobody"\n')
    sup.start()
    sup.wait_log(r"victim@1: serving")
    sup.wait_log(r"evil@1: serving")
    found = json.loads(sup.wait_log(r"probe: (\{.*\})"))
    assert found["uid"] == found["euid"] == nobody
    assert found["groups"] == [found["gid"]], "no supplementary group of root's"
    assert found["list run_dir"] == "PermissionError"
    assert found["read key"] == "PermissionError"
    assert found["connect control"] == "PermissionError"
    assert found["signal victim"] == "PermissionError"
    assert found["write bundle dir"] == "PermissionError"
    pid = wait_for(lambda: _pids(sup).get("evil@1"), what="the evil worker")
    assert isinstance(pid, int) and _uid(pid) == nobody
    with open(f"/proc/{pid}/status") as status:
        assert re.search(r"^NoNewPrivs:\s+1$", status.read(), re.M)
    assert request(port, "incr").startswith("count=1 generation=1 tag=e0")
    assert request(victim_port, "incr").startswith("count=1 generation=1")
    # Its state still hands over: the snapshot travels over its channel.
    save(evil / "counter.py", counter_source("e1", start=probe))
    os.chmod(evil / "counter.py", 0o644)
    sup.wait_log(r"evil@2: swapped from evil@1")
    assert request(port, "incr").startswith("count=2 generation=2 tag=e1")


@pytest.mark.skipif(os.geteuid() != 0, reason="a bundle user needs a root supervisor")
def test_check_reports_a_bad_bundle_user(hotsup: MakeHotsup, world_readable: Path) -> None:
    sup = hotsup()
    unknown = write_bundle(sup.bundles / "unknown", counter_source("v0"), free_port(),
                           extra='user = "no-such-user-hs"')
    hidden = write_bundle(sup.bundles / "hidden", counter_source("v0"), free_port(),
                          extra='user = "nobody"\ngroup = "no-such-group-hs"')
    done = sup.cli("check", str(sup.config))
    assert done.returncode == 1
    assert f"{unknown / 'bundle.toml'}: user: no such user: 'no-such-user-hs'" in done.stderr
    assert f"{hidden / 'bundle.toml'}: group: no such group: 'no-such-group-hs'" in done.stderr
    save(hidden / "bundle.toml", (hidden / "bundle.toml").read_text().replace(
        'group = "no-such-group-hs"', ""))
    done = sup.cli("check", str(sup.config))
    assert f"{hidden / 'bundle.toml'}: user: user 'nobody' cannot read the bundle " \
           f"directory: " in done.stderr, done.stderr


def test_a_bundle_user_needs_a_root_supervisor(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from hotsup.supervisor import config

    bundle = write_bundle(tmp_path / "bundles" / "counter", counter_source("v0"), free_port(),
                          extra='user = "nobody"')
    (tmp_path / "config.toml").write_text('[supervisor]\nbundles_dir = "bundles"\n')
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    problems = config.check(tmp_path / "config.toml")
    assert any(line.startswith(f"{bundle / 'bundle.toml'}: user: the worker can run as "
                               "'nobody' only when the supervisor runs as root") for line in
               problems), problems


def test_a_large_settings_table_reaches_the_worker(hotsup: MakeHotsup) -> None:
    """The spec travels over the worker's channel as a payload, not in the
    zygote's 1 MiB packet: a 2 MiB [settings] table is no problem."""
    sup = hotsup()
    port = free_port()
    blob = "x" * (2 * 1024 * 1024)
    start = "print('settings:', len(self.ctx.settings['blob']), flush=True)"
    write_bundle(sup.bundles / "counter", counter_source("v0", start=start), port,
                 extra=f'[settings]\nblob = "{blob}"\n')
    sup.start()
    sup.wait_log(r"counter@1: serving")
    assert sup.wait_log(r"settings: (\d+)") == str(len(blob))
