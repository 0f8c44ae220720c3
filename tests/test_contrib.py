"""contrib/ and the Dockerfile, exercised as far as a machine without Docker
or a running systemd allows.

* Dockerfile: every COPY source exists; the COPYs are replayed into a
  directory standing for the image's filesystem; what the RUN steps need is
  there (the package pip installs, hotsup check on the image's config, which
  is run); CMD's config validates with ``hotsup check``; EXPOSE covers every
  port the config binds.
* contrib/kubernetes/deployment.yaml: the probes ask /readyz and /healthz on
  the metrics port the image's config serves, the container ports are those
  it exposes, the user is numeric for runAsNonRoot.
* contrib/hotsup.service and hotsup.socket: ``systemd-analyze verify`` finds
  nothing to say; the socket's name is one a bundle can bind.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from hotsup.supervisor.config import load_bundle, load_config

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
CONTRIB = REPO / "contrib"


def instructions(path: Path) -> list[tuple[str, str]]:
    """The Dockerfile's (INSTRUCTION, arguments), continuation lines joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        found.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return found


def replay_copies(root: Path) -> tuple[Path, list[str]]:
    """The image's filesystem as far as COPY makes it, under ``root``; the
    WORKDIR at the end and the RUN commands."""
    workdir = Path("/")
    runs: list[str] = []
    for word, rest in instructions(DOCKERFILE):
        if word == "WORKDIR":
            workdir = workdir / rest
            (root / workdir.relative_to("/")).mkdir(parents=True, exist_ok=True)
        elif word == "RUN":
            runs.append(rest)
        elif word == "COPY":
            *sources, dest = shlex.split(rest)
            assert not any(s.startswith("--") for s in sources), "no COPY --from/--chown here"
            target = root / (workdir / dest).relative_to("/")
            for source in sources:
                origin = REPO / source
                assert origin.exists(), f"Dockerfile: COPY {source}: not in the repository"
                if origin.is_dir():
                    shutil.copytree(origin, target, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns(*dockerignored()))
                elif dest.endswith("/") or len(sources) > 1:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target / origin.name)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(origin, target)
    return workdir, runs


def dockerignored() -> list[str]:
    """.dockerignore's patterns, as names to leave out at any depth."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip().removeprefix("**/") for line in lines
            if line.strip() and not line.startswith("#")]


def hotsup_check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hotsup.supervisor.cli", "check", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_the_dockerfile_builds_on_python_3_11_slim_and_its_config_validates(
        tmp_path: Path) -> None:
    steps = instructions(DOCKERFILE)
    assert steps[0] == ("FROM", "python:3.11-slim")
    workdir, runs = replay_copies(tmp_path)

    # RUN pip install /opt/hotsup: the package's source is all there.
    install = next(r for r in runs if "pip install" in r)
    package = tmp_path / install.split("pip install", 1)[1].split()[0].lstrip("/")
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    assert (package / project["readme"]).is_file()
    layout = tomllib.loads((package / "pyproject.toml").read_text())["tool"]["setuptools"]
    for directory in layout["package-dir"].values():
        assert (package / directory / "__init__.py").is_file(), directory

    # RUN hotsup check config.toml (in WORKDIR), and CMD's config: both valid.
    assert any(r.startswith("hotsup check ") for r in runs)
    cmd = json.loads(dict(steps)["CMD"])
    assert cmd[:2] == ["hotsup", "start"]
    config = tmp_path / Path(cmd[2]).relative_to("/")
    assert config.parent == tmp_path / workdir.relative_to("/")
    result = hotsup_check(config)
    assert result.returncode == 0, result.stdout + result.stderr

    # EXPOSE: every port the config binds, and the metrics port.
    exposed = {int(p) for p in dict(steps)["EXPOSE"].split()}
    assert bound_ports(config) | {metrics_port(config)} <= exposed
    user = dict(steps)["USER"]
    assert re.fullmatch(r"\d+:\d+", user) and not user.startswith("0"), user


def test_the_kubernetes_deployment_probes_what_the_image_serves(tmp_path: Path) -> None:
    replay_copies(tmp_path)
    config = tmp_path / "srv" / "hotsup" / "config.toml"
    deployment, service = yaml.safe_load_all((CONTRIB / "kubernetes" /
                                              "deployment.yaml").read_text())
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    rollout = deployment["spec"]["strategy"]
    assert rollout["type"] == "RollingUpdate"
    assert rollout["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == metrics_port(config)
    assert set(ports.values()) == bound_ports(config) | {metrics_port(config)}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # The drain fits in the grace period.
    drain = load_config(config).defaults.drain_timeout
    assert pod["terminationGracePeriodSeconds"] > drain + 5 + 5  # kill grace, preStop
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed "
                    "(Debian package systemd; .ci/run installs it)")
def test_the_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on the units, with ExecStart pointing at this
    hotsup (verify wants the binaries to exist) and a user that exists here."""
    assert SYSTEMD_ANALYZE is not None
    hotsup = Path(sys.executable).parent / "hotsup"
    if not hotsup.exists():
        pytest.skip(f"no hotsup console script beside {sys.executable}")
    service = (CONTRIB / "hotsup.service").read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "KillMode=mixed"):
        assert line in service.splitlines(), line
    assert re.search(r"^WatchdogSec=\d+$", service, re.M)
    local = re.sub(r"^(User|Group)=.*$", r"\1=root",
                   service.replace("/opt/hotsup/bin/hotsup", str(hotsup)), flags=re.M)
    (tmp_path / "hotsup.service").write_text(local)
    shutil.copy(CONTRIB / "hotsup.socket", tmp_path / "hotsup.socket")
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", "./hotsup.socket",
                             "./hotsup.service"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys are only warned of
    socket_unit = (CONTRIB / "hotsup.socket").read_text()
    name = re.search(r"^FileDescriptorName=(\S+)$", socket_unit, re.M)
    assert name is not None
    example = (CONTRIB / "systemd.toml").read_text()
    assert f'bind = "systemd:{name[1]}"' in example


def bound_ports(config: Path) -> set[int]:
    """The TCP ports every bundle of ``config`` binds."""
    loaded = load_config(config)
    return {sock.port for source in loaded.sources().values()
            for sock in load_bundle(source, loaded).sockets if sock.port}


def metrics_port(config: Path) -> int:
    metrics = load_config(config).metrics
    assert metrics is not None, f"{config}: no [supervisor] metrics"
    return metrics[1]
