"""Unit tests of hotsup.supervisor.config: config.toml, bundle.toml, check(), discover().

Every file is written into pytest's tmp_path; nothing is started, nothing is bound.
"""

from __future__ import annotations

import re
from pathlib import Path
from textwrap import dedent

import pytest
from hotsup.supervisor.config import (
    BundleSource,
    BundleSpec,
    ConfigError,
    Timing,
    check,
    discover,
    load_bundle,
    load_config,
    parse_bind,
)

pytestmark = pytest.mark.timeout(10)


# -- helpers ----------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dedent(text).lstrip("\n"))
    return path


def make_bundle(
    directory: Path, manifest: str, module: str | None = "app", body: str = "class App: pass\n"
) -> Path:
    """A bundle directory with a bundle.toml and (unless module is None) module.py."""
    write(directory / "bundle.toml", manifest)
    if module is not None:
        write(directory / f"{module}.py", body)
    return directory


def make_config(tmp_path: Path, text: str = "", *, bundles_dir: bool = True) -> Path:
    if bundles_dir:
        (tmp_path / "bundles").mkdir(exist_ok=True)
    return write(tmp_path / "config.toml", text)


def config_problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems, "ConfigError without problems"
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def bundle_problems(tmp_path: Path, manifest: str, module: str | None = "app") -> list[str]:
    """Problems of one drop-in bundle "b" under a minimal valid config."""
    config = load_config(make_config(tmp_path))
    make_bundle(tmp_path / "bundles" / "b", manifest, module)
    source = config.sources()["b"]
    with pytest.raises(ConfigError) as info:
        load_bundle(source, config)
    return info.value.problems


def line_for(problems: list[str], prefix: str) -> str:
    """The message of the one problem that starts with prefix (file and key).

    Only the message is returned, so an assertion cannot pass on the file's path
    (tmp_path holds the test's name).
    """
    matches = [p for p in problems if p.startswith(prefix)]
    assert len(matches) == 1, f"expected one problem starting {prefix!r}, got {problems!r}"
    return matches[0][len(prefix):]


def cfg_prefix(tmp_path: Path, key: str) -> str:
    return f"{(tmp_path / 'config.toml').resolve()}: {key}: "


def manifest_prefix(tmp_path: Path, key: str, name: str = "b") -> str:
    return f"{(tmp_path / 'bundles' / name / 'bundle.toml').resolve()}: {key}: "


# -- a valid setup ----------------------------------------------------------------

VALID_CONFIG = """
[supervisor]
bundles_dir = "bundles"
run_dir = "state"
preload = ["json"]
watch_quiet_ms = 40
watch_batch_ms = 2000
log_level = "DEBUG"

[defaults]
start_timeout = 3.5
quiesce_timeout = 2
drain_timeout = 0
checkpoint_interval = 15
max_restarts = 0
restart_window = 30.0

[bundles.api]
path = "services/api"

[bundles.alpha]
start_timeout = 9.0
version = "2.0.0-override"
[bundles.alpha.settings]
greeting = "hello"
extra = 42
"""


@pytest.fixture
def valid_setup(tmp_path: Path) -> Path:
    cfg = make_config(tmp_path, VALID_CONFIG)
    make_bundle(tmp_path / "bundles" / "alpha", """
        entry = "app:App"
        version = "1.0.0"
        quiesce_timeout = 1.5
        [sockets.main]
        bind = "127.0.0.1:8101"
        [settings]
        greeting = "hi"
        keep = true
    """)
    make_bundle(tmp_path / "bundles" / "beta", """
        entry = "pkg.mod:make"
        factory = false
        multiprocessing_logging = false
        [sockets.main]
        bind = "localhost:8102"
        [sockets.local]
        bind = "unix:beta.sock"
    """, module=None)
    write(tmp_path / "bundles" / "beta" / "pkg" / "__init__.py", "")
    write(tmp_path / "bundles" / "beta" / "pkg" / "mod.py", "def make(ctx): pass\n")
    make_bundle(tmp_path / "services" / "api", """
        entry = "api:Api"
        [sockets.http]
        bind = "[::1]:8103"
    """, module="api", body="class Api: pass\n")  # check() imports the entry
    return cfg


def test_valid_config_fields(valid_setup: Path) -> None:
    base = valid_setup.resolve().parent
    config = load_config(valid_setup)
    assert config.path == valid_setup.resolve()
    assert config.bundles_dir == base / "bundles"
    assert config.run_dir == base / "state"
    assert config.preload == ("json",)
    assert (config.watch_quiet_ms, config.watch_batch_ms) == (40, 2000)
    assert config.log_level == "debug"
    assert config.defaults == Timing(
        start_timeout=3.5, quiesce_timeout=2, drain_timeout=0, checkpoint_interval=15,
        max_restarts=0, restart_window=30.0,
    )


def test_defaults_when_tables_are_absent(tmp_path: Path) -> None:
    config = load_config(make_config(tmp_path, ""))
    assert config.bundles_dir == tmp_path.resolve() / "bundles"
    assert config.run_dir == tmp_path.resolve() / ".hotsup"
    assert config.preload == ()
    assert (config.watch_quiet_ms, config.watch_batch_ms) == (30, 1600)
    assert config.log_level == "info"
    assert config.defaults == Timing()
    assert config.declared == {}
    assert config.sources() == {}


def test_sources_lists_drop_ins_and_declared(valid_setup: Path) -> None:
    base = valid_setup.resolve().parent
    sources = load_config(valid_setup).sources()
    assert sorted(sources) == ["alpha", "api", "beta"]
    assert sources["api"].path == base / "services" / "api"
    assert sources["api"].manifest == base / "services" / "api" / "bundle.toml"
    assert sources["beta"].path == base / "bundles" / "beta"
    assert sources["beta"].overrides == {}
    # alpha is a drop-in that config.toml overrides: same place, with the overrides
    assert sources["alpha"].path == base / "bundles" / "alpha"
    assert sources["alpha"].overrides["start_timeout"] == 9.0
    assert "path" not in sources["api"].overrides


def test_overrides_merge_over_manifest(valid_setup: Path) -> None:
    config = load_config(valid_setup)
    spec = load_bundle(config.sources()["alpha"], config)
    assert spec.name == "alpha"
    assert spec.entry == "app:App"
    assert spec.kind == "service"
    # settings merge key by key: manifest keys kept, config.toml keys win or add
    assert spec.settings == {"greeting": "hello", "keep": True, "extra": 42}
    # a scalar key replaces
    assert spec.version == "2.0.0-override"
    # timing: config.toml override > manifest > [defaults]
    assert spec.timing.start_timeout == 9.0
    assert spec.timing.quiesce_timeout == 1.5
    assert spec.timing.drain_timeout == 0
    assert spec.timing.checkpoint_interval == 15
    assert spec.timing.restart_window == 30.0
    assert [(s.name, s.host, s.port) for s in spec.sockets] == [("main", "127.0.0.1", 8101)]


def test_drop_in_and_declared_bundle_specs(valid_setup: Path) -> None:
    config = load_config(valid_setup)
    sources = config.sources()
    beta = load_bundle(sources["beta"], config)
    assert beta.entry == "pkg.mod:make"
    assert beta.factory is False
    assert beta.multiprocessing_logging is False
    assert beta.timing == config.defaults
    by_name = {s.name: s for s in beta.sockets}
    assert (by_name["main"].host, by_name["main"].port) == ("127.0.0.1", 8102)
    assert by_name["main"].bind == "localhost:8102"
    assert by_name["local"].path == sources["beta"].path / "beta.sock"
    assert by_name["local"].key == f"unix:{sources['beta'].path / 'beta.sock'}"

    api = load_bundle(sources["api"], config)
    assert api.path == valid_setup.resolve().parent / "services" / "api"
    assert [(s.host, s.port, s.key) for s in api.sockets] == [("::1", 8103, "tcp:::1:8103")]


def test_socket_override_replaces_one_socket(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, """
        [bundles.b.sockets.main]
        bind = "127.0.0.1:9001"
    """)
    make_bundle(tmp_path / "bundles" / "b", """
        entry = "app:App"
        [sockets.main]
        bind = "127.0.0.1:8001"
        [sockets.admin]
        bind = "127.0.0.1:8002"
    """)
    config = load_config(cfg)
    spec = load_bundle(config.sources()["b"], config)
    assert {s.name: s.port for s in spec.sockets} == {"main": 9001, "admin": 8002}


def test_valid_setup_checks_clean(valid_setup: Path) -> None:
    assert check(valid_setup) == []


def test_demo_config_of_the_repo_checks_clean() -> None:
    demo = Path(__file__).resolve().parent.parent / "config.toml"
    if not demo.is_file():
        pytest.skip("no demo config.toml in the repo")
    assert check(demo) == []


# -- config.toml problems --------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    problems = config_problems(tmp_path / "nope.toml")
    assert problems == [f"{tmp_path / 'nope.toml'}: file not found"]


def test_config_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.toml").mkdir()
    problems = config_problems(tmp_path / "dir.toml")
    expected = f"{(tmp_path / 'dir.toml').resolve()}: is a directory, expected a TOML file"
    assert problems == [expected]


def test_toml_syntax_error(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, """
        [supervisor]
        log_level = "info
    """)
    problems = config_problems(cfg)
    assert len(problems) == 1
    assert problems[0].startswith(f"{cfg.resolve()}: not valid TOML: ")
    assert "line 2" in problems[0]


def test_unknown_top_level_key(tmp_path: Path) -> None:
    problems = config_problems(make_config(tmp_path, 'colour = "blue"\n'))
    line = line_for(problems, cfg_prefix(tmp_path, "colour"))
    assert "unknown key" in line
    assert "supervisor" in line and "defaults" in line and "bundles" in line


def test_unknown_supervisor_key(tmp_path: Path) -> None:
    problems = config_problems(make_config(tmp_path, """
        [supervisor]
        bundle_dir = "bundles"
    """))
    line = line_for(problems, cfg_prefix(tmp_path, "supervisor.bundle_dir"))
    assert "unknown key" in line
    assert "bundles_dir" in line


def test_unknown_defaults_key(tmp_path: Path) -> None:
    problems = config_problems(make_config(tmp_path, """
        [defaults]
        start_timout = 1
    """))
    line = line_for(problems, cfg_prefix(tmp_path, "defaults.start_timout"))
    assert "unknown key" in line
    assert "start_timeout" in line


def test_unknown_bundle_override_key(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, """
        [bundles.b]
        entrypoint = "app:App"
    """)
    make_bundle(tmp_path / "bundles" / "b", 'entry = "app:App"\n')
    line = line_for(config_problems(cfg), cfg_prefix(tmp_path, "bundles.b.entrypoint"))
    assert "unknown key" in line


@pytest.mark.parametrize(
    ("toml", "key", "expected"),
    [
        ('[defaults]\nstart_timeout = "fast"\n', "defaults.start_timeout",
         'expected a number, got "fast"'),
        ("[defaults]\ndrain_timeout = true\n", "defaults.drain_timeout",
         "expected a number, got True"),
        ("[defaults]\nmax_restarts = 2.5\n", "defaults.max_restarts",
         "expected a whole number, got 2.5"),
        ('[supervisor]\nwatch_quiet_ms = "30"\n', "supervisor.watch_quiet_ms",
         'expected a whole number, got "30"'),
        ("[supervisor]\nwatch_batch_ms = false\n", "supervisor.watch_batch_ms",
         "expected a whole number, got False"),
        ("[supervisor]\nlog_level = 3\n", "supervisor.log_level",
         "expected a string, got 3"),
        ("[supervisor]\nrun_dir = 1.5\n", "supervisor.run_dir",
         "expected a string, got 1.5"),
        ('[supervisor]\npreload = "numpy"\n', "supervisor.preload",
         'expected a list of module names, got "numpy"'),
        ('[supervisor]\npreload = ["ok", 3]\n', "supervisor.preload",
         "expected a list of module names"),
        ('supervisor = "x"\n', "supervisor", 'expected a table, got "x"'),
        ("defaults = 3\n", "defaults", "expected a table, got 3"),
        ("[bundles]\nb = 1\n", "bundles.b", "expected a table, got 1"),
    ],
)
def test_wrong_types(tmp_path: Path, toml: str, key: str, expected: str) -> None:
    problems = config_problems(make_config(tmp_path, toml))
    line = line_for(problems, cfg_prefix(tmp_path, key))
    assert expected in line


def test_bundles_dir_of_wrong_type(tmp_path: Path) -> None:
    problems = config_problems(make_config(tmp_path, "[supervisor]\nbundles_dir = 7\n"))
    assert "expected a string, got 7" in line_for(
        problems, cfg_prefix(tmp_path, "supervisor.bundles_dir"))


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("start_timeout", "0", "must be greater than 0, got 0"),
        ("start_timeout", "-1.5", "must be greater than 0, got -1.5"),
        ("quiesce_timeout", "0.0", "must be greater than 0, got 0.0"),
        ("restart_window", "0", "must be greater than 0, got 0"),
        ("drain_timeout", "-1", "must be at least 0, got -1"),
        ("checkpoint_interval", "-0.5", "must be at least 0, got -0.5"),
        ("max_restarts", "-1", "must be at least 0, got -1"),
    ],
)
def test_negative_and_zero_timeouts(tmp_path: Path, key: str, value: str, expected: str) -> None:
    problems = config_problems(make_config(tmp_path, f"[defaults]\n{key} = {value}\n"))
    assert expected in line_for(problems, cfg_prefix(tmp_path, f"defaults.{key}"))


def test_zero_watch_quiet_ms(tmp_path: Path) -> None:
    problems = config_problems(make_config(tmp_path, "[supervisor]\nwatch_quiet_ms = 0\n"))
    assert "must be greater than 0, got 0" in line_for(
        problems, cfg_prefix(tmp_path, "supervisor.watch_quiet_ms"))


def test_batch_shorter_than_quiet(tmp_path: Path) -> None:
    problems = config_problems(make_config(tmp_path, """
        [supervisor]
        watch_quiet_ms = 500
        watch_batch_ms = 100
    """))
    line = line_for(problems, cfg_prefix(tmp_path, "supervisor.watch_batch_ms"))
    assert "must be at least watch_quiet_ms (500), got 100" in line


def test_bad_log_level(tmp_path: Path) -> None:
    problems = config_problems(make_config(tmp_path, '[supervisor]\nlog_level = "loud"\n'))
    line = line_for(problems, cfg_prefix(tmp_path, "supervisor.log_level"))
    assert '"loud"' in line
    assert "debug, info, warning, error" in line


def test_missing_bundles_dir(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, '[supervisor]\nbundles_dir = "missing"\n', bundles_dir=False)
    line = line_for(config_problems(cfg), cfg_prefix(tmp_path, "supervisor.bundles_dir"))
    assert f"{tmp_path.resolve() / 'missing'} is not a directory" in line


def test_empty_bundles_dir_disables_drop_ins(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, """
        [supervisor]
        bundles_dir = ""
        [bundles.api]
        path = "api"
    """, bundles_dir=False)
    make_bundle(tmp_path / "api", 'entry = "app:App"\n')
    config = load_config(cfg)
    assert config.bundles_dir is None
    assert list(config.sources()) == ["api"]


def test_declared_bundle_without_manifest(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, '[bundles.api]\npath = "services/api"\n')
    (tmp_path / "services" / "api").mkdir(parents=True)
    line = line_for(config_problems(cfg), cfg_prefix(tmp_path, "bundles.api.path"))
    assert "has no bundle.toml" in line
    assert str(tmp_path.resolve() / "services" / "api") in line


def test_declared_bundle_without_path_or_bundles_dir(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, '[supervisor]\nbundles_dir = ""\n[bundles.api]\nkind = "service"\n')
    line = line_for(config_problems(cfg), cfg_prefix(tmp_path, "bundles.api.path"))
    assert "no bundles_dir" in line


def test_bad_bundle_name_in_config(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, '[bundles."bad name"]\npath = "x"\n')
    line = line_for(config_problems(cfg), cfg_prefix(tmp_path, "bundles.bad name"))
    assert "letters, digits" in line


def test_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, """
        extra = 1
        [supervisor]
        log_level = "loud"
        preload = "x"
        [defaults]
        start_timeout = -1
        drain_timeout = "long"
    """)
    problems = config_problems(cfg)
    for key in ("extra", "supervisor.log_level", "supervisor.preload",
                "defaults.start_timeout", "defaults.drain_timeout"):
        line_for(problems, cfg_prefix(tmp_path, key))
    assert len(problems) == 5


# -- bundle.toml problems --------------------------------------------------------


def test_unknown_key_in_bundle_toml(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, 'entry = "app:App"\nentry_point = "x"\n')
    line = line_for(problems, manifest_prefix(tmp_path, "entry_point"))
    assert "unknown key" in line
    assert "entry" in line and "sockets" in line


def test_unknown_key_in_bundle_socket(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, """
        entry = "app:App"
        [sockets.main]
        bind = "127.0.0.1:8000"
        backlog = 5
    """)
    assert "unknown key" in line_for(problems, manifest_prefix(tmp_path, "sockets.main.backlog"))


def test_bundle_toml_syntax_error(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, 'entry = "app:App\n')
    assert len(problems) == 1
    assert problems[0].startswith(
        f"{(tmp_path / 'bundles' / 'b' / 'bundle.toml').resolve()}: not valid TOML: ")


def test_missing_entry(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, 'version = "1"\n')
    assert line_for(problems, manifest_prefix(tmp_path, "entry")).startswith("missing")


def test_malformed_entry(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, 'entry = "counter"\n')
    line = line_for(problems, manifest_prefix(tmp_path, "entry"))
    assert 'expected "module:attribute", got "counter"' in line


@pytest.mark.parametrize("entry", ["app:", ":App", "app:App:x", "1app:App", "app-x:App"])
def test_other_malformed_entries(tmp_path: Path, entry: str) -> None:
    problems = bundle_problems(tmp_path, f'entry = "{entry}"\n')
    assert f'got "{entry}"' in line_for(problems, manifest_prefix(tmp_path, "entry"))


def test_entry_module_not_found(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, 'entry = "missing:App"\n')
    line = line_for(problems, manifest_prefix(tmp_path, "entry"))
    assert "module 'missing' not found in" in line
    assert str(tmp_path.resolve() / "bundles" / "b") in line


def test_entry_submodule_not_found(tmp_path: Path) -> None:
    # app.py exists, but app is a module, not a package: app.sub cannot exist
    problems = bundle_problems(tmp_path, 'entry = "app.sub:App"\n')
    assert "module 'app.sub' not found" in line_for(problems, manifest_prefix(tmp_path, "entry"))


def test_entry_of_wrong_type(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, "entry = 5\n")
    assert any(p.startswith(manifest_prefix(tmp_path, "entry")) and "expected a string, got 5"
               in p for p in problems), problems


def test_unknown_kind(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, 'entry = "app:App"\nkind = "cgi"\n')
    line = line_for(problems, manifest_prefix(tmp_path, "kind"))
    assert 'expected one of service, asgi, wsgi, got "cgi"' in line


def asgi_spec(tmp_path: Path, manifest: str, config_text: str = "") -> BundleSpec:
    make_bundle(tmp_path / "bundles" / "b", manifest)
    config = load_config(make_config(tmp_path, config_text))
    return load_bundle(config.sources()["b"], config)


def test_asgi_bundle_on_its_http_socket(tmp_path: Path) -> None:
    spec = asgi_spec(tmp_path, """
        entry = "app:app"
        kind = "asgi"
        [sockets.http]
        bind = "127.0.0.1:8103"
    """)
    assert (spec.kind, spec.factory) == ("asgi", False)
    assert [s.name for s in spec.sockets] == ["http"]


def test_asgi_bundle_on_its_only_socket_with_a_factory(tmp_path: Path) -> None:
    spec = asgi_spec(tmp_path, """
        entry = "app:make_app"
        kind = "asgi"
        factory = true
        [sockets.web]
        bind = "127.0.0.1:8103"
    """)
    assert (spec.kind, spec.factory) == ("asgi", True)


def test_asgi_factory_and_kind_from_config_toml(tmp_path: Path) -> None:
    spec = asgi_spec(tmp_path, """
        entry = "app:make_app"
        [sockets.http]
        bind = "127.0.0.1:8103"
    """, '[bundles.b]\nkind = "asgi"\nfactory = true\n')
    assert (spec.kind, spec.factory) == ("asgi", True)


def test_websockets_mode_defaults_to_close_and_takes_resume(tmp_path: Path) -> None:
    manifest = 'entry = "app:app"\nkind = "asgi"\n{}\n[sockets.http]\nbind = "127.0.0.1:8103"\n'
    assert asgi_spec(tmp_path, manifest.format("")).websockets == "close"
    assert asgi_spec(tmp_path, manifest.format('websockets = "resume"')).websockets == "resume"


@pytest.mark.parametrize("value", ['"keep"', "1", '"Resume"'])
def test_a_bad_websockets_mode_names_bundle_toml_and_the_key(tmp_path: Path, value: str) -> None:
    problems = bundle_problems(tmp_path, f'entry = "app:app"\nkind = "asgi"\nwebsockets = {value}\n'
                               '[sockets.http]\nbind = "127.0.0.1:8103"\n')
    line = line_for(problems, manifest_prefix(tmp_path, "websockets"))
    assert line.startswith('expected "close" (each open WebSocket is closed with 1012'), line
    assert line.endswith(f"got {value}"), line


def test_websockets_on_a_service_bundle_is_refused(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, 'entry = "app:App"\nwebsockets = "resume"\n')
    assert line_for(problems, manifest_prefix(tmp_path, "websockets")).startswith(
        'only for kind = "asgi"')


def test_factory_on_a_service_bundle_is_refused(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, 'entry = "app:App"\nfactory = true\n')
    assert line_for(problems, manifest_prefix(tmp_path, "factory")) == (
        'only for kind = "asgi" or "wsgi" (a service entry is always called as Entry(ctx)); '
        "remove the key")


def test_factory_override_on_a_service_bundle_names_config_toml(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "[bundles.b]\nfactory = true\n")
    make_bundle(tmp_path / "bundles" / "b", 'entry = "app:App"\n')
    line = line_for(check(cfg), cfg_prefix(tmp_path, "bundles.b.factory"))
    assert line.startswith('only for kind = "asgi"')


@pytest.mark.parametrize(
    ("sockets", "expected"),
    [
        ("", 'an asgi bundle needs a socket to serve (as in [sockets.http] '
             'bind = "127.0.0.1:8103")'),
        ('[sockets.a]\nbind = "127.0.0.1:1"\n[sockets.b]\nbind = "127.0.0.1:2"\n',
         "an asgi bundle serves one socket: name it http, or declare only one "
         "(declared: a, b)"),
        ('[sockets.http]\nbind = "127.0.0.1:1"\n[sockets.admin]\nbind = "127.0.0.1:2"\n',
         "an asgi bundle serves only its socket named http; remove the others (admin)"),
    ],
)
def test_asgi_bundle_sockets(tmp_path: Path, sockets: str, expected: str) -> None:
    problems = bundle_problems(tmp_path, f'entry = "app:app"\nkind = "asgi"\n{sockets}')
    assert line_for(problems, manifest_prefix(tmp_path, "sockets")) == expected


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        ("version = 1", "version", "expected a string, got 1"),
        ('factory = "yes"', "factory", 'expected true or false, got "yes"'),
        ("multiprocessing_logging = 1", "multiprocessing_logging",
         "expected true or false, got 1"),
        ('start_timeout = "10"', "start_timeout", 'expected a number, got "10"'),
        ("quiesce_timeout = true", "quiesce_timeout", "expected a number, got True"),
        ("drain_timeout = -3", "drain_timeout", "must be at least 0, got -3"),
        ("restart_window = 0", "restart_window", "must be greater than 0, got 0"),
        ('settings = "x"', "settings", 'expected a table, got "x"'),
        ("sockets = [1]", "sockets", "expected a table, got [1]"),
    ],
)
def test_bundle_wrong_types(tmp_path: Path, line: str, key: str, expected: str) -> None:
    problems = bundle_problems(tmp_path, f'entry = "app:App"\n{line}\n')
    assert expected in line_for(problems, manifest_prefix(tmp_path, key))


def test_socket_without_bind(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, 'entry = "app:App"\n[sockets.main]\n')
    assert "missing (as in" in line_for(problems, manifest_prefix(tmp_path, "sockets.main.bind"))


def test_socket_not_a_table(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, 'entry = "app:App"\n[sockets]\nmain = "127.0.0.1:1"\n')
    assert "expected a table" in line_for(problems, manifest_prefix(tmp_path, "sockets.main"))


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("nonsense", 'is not "HOST:PORT" or "unix:PATH"'),
        (":8000", 'is not "HOST:PORT" or "unix:PATH"'),
        ("127.0.0.1:99999", 'port "99999" is not a number from 0 to 65535'),
        ("127.0.0.1:-1", 'port "-1" is not a number from 0 to 65535'),
        ("127.0.0.1:", 'port "" is not a number from 0 to 65535'),
        ("127.0.0.1:http", 'port "http" is not a number from 0 to 65535'),
        ("example.com:80", 'host "example.com" is not an IP address'),
        ("256.0.0.1:80", 'host "256.0.0.1" is not an IP address'),
        ("unix:", '"unix:" needs a path'),
    ],
)
def test_bad_bind_addresses(tmp_path: Path, bind: str, expected: str) -> None:
    problems = bundle_problems(tmp_path, f"""
        entry = "app:App"
        [sockets.main]
        bind = "{bind}"
    """)
    assert expected in line_for(problems, manifest_prefix(tmp_path, "sockets.main.bind"))


def test_bind_of_wrong_type(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, 'entry = "app:App"\n[sockets.main]\nbind = 8000\n')
    assert any(p.startswith(manifest_prefix(tmp_path, "sockets.main.bind"))
               and "expected a string, got 8000" in p for p in problems), problems


def test_two_sockets_of_one_bundle_on_one_address(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, """
        entry = "app:App"
        [sockets.a]
        bind = "127.0.0.1:8000"
        [sockets.b]
        bind = "localhost:8000"
    """)
    line = line_for(problems, manifest_prefix(tmp_path, "sockets.b.bind"))
    assert "localhost:8000 is also used by sockets.a" in line


def test_two_port_zero_sockets_are_fine(tmp_path: Path) -> None:
    config = load_config(make_config(tmp_path))
    make_bundle(tmp_path / "bundles" / "b", """
        entry = "app:App"
        [sockets.a]
        bind = "127.0.0.1:0"
        [sockets.b]
        bind = "127.0.0.1:0"
    """)
    spec = load_bundle(config.sources()["b"], config)
    assert [s.port for s in spec.sockets] == [0, 0]


def test_two_unix_sockets_of_one_bundle_on_one_path(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, """
        entry = "app:App"
        [sockets.a]
        bind = "unix:app.sock"
        [sockets.b]
        bind = "unix:app.sock"
    """)
    assert "also used by sockets.a" in line_for(
        problems, manifest_prefix(tmp_path, "sockets.b.bind"))


def test_bundle_problems_are_all_reported(tmp_path: Path) -> None:
    problems = bundle_problems(tmp_path, """
        entry = "nope"
        kind = "cgi"
        colour = "red"
        start_timeout = 0
        [sockets.main]
        bind = "example.com:80"
    """)
    for key in ("entry", "kind", "colour", "start_timeout", "sockets.main.bind"):
        line_for(problems, manifest_prefix(tmp_path, key))
    assert len(problems) == 5


def test_missing_manifest_of_drop_in_removed_later(tmp_path: Path) -> None:
    config = load_config(make_config(tmp_path))
    source = BundleSource("gone", tmp_path / "bundles" / "gone")
    with pytest.raises(ConfigError) as info:
        load_bundle(source, config)
    assert info.value.problems == [f"{source.manifest}: file not found"]


def test_bad_override_names_config_toml(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, '[bundles.b]\nstart_timeout = "soon"\n')
    make_bundle(tmp_path / "bundles" / "b", 'entry = "app:App"\n')
    problems = check(cfg)
    line = line_for(problems, cfg_prefix(tmp_path, "bundles.b.start_timeout"))
    assert 'expected a number, got "soon"' in line


# -- parse_bind ---------------------------------------------------------------------


def test_entry_with_an_empty_module_part_is_malformed(tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundles" / "b", 'entry = "app.:App"\n')
    problems = check(make_config(tmp_path, ""))
    assert any("entry: expected \"module:attribute\"" in p for p in problems), problems


def test_declared_paths_are_normalised(tmp_path: Path) -> None:
    make_bundle(tmp_path / "elsewhere" / "x", 'entry = "app:App"\n')
    cfg = make_config(tmp_path, '[bundles.x]\npath = "bundles/../elsewhere/x"\n')
    assert load_config(cfg).declared["x"].path == tmp_path / "elsewhere" / "x"


def test_default_bundles_dir_may_be_absent(tmp_path: Path) -> None:
    make_bundle(tmp_path / "svc" / "api", 'entry = "app:App"\n')
    cfg = tmp_path / "only-declared.toml"
    cfg.write_text('[bundles.api]\npath = "svc/api"\n')
    config = load_config(cfg)
    assert config.bundles_dir is None
    assert list(config.sources()) == ["api"]


def test_parse_bind_tcp(tmp_path: Path) -> None:
    assert parse_bind("127.0.0.1:8000", tmp_path) == ("127.0.0.1", 8000, None)
    assert parse_bind("0.0.0.0:0", tmp_path) == ("0.0.0.0", 0, None)
    assert parse_bind("127.0.0.1:65535", tmp_path) == ("127.0.0.1", 65535, None)


@pytest.mark.parametrize("bind", ["127.0.0.1:\u00b2", "127.0.0.1:\uff18\uff10", "::1:8080"])
def test_parse_bind_refuses_odd_ports_and_bare_ipv6(tmp_path: Path, bind: str) -> None:
    with pytest.raises(ValueError, match=re.escape(bind)):
        parse_bind(bind, tmp_path)


def test_parse_bind_localhost_is_loopback(tmp_path: Path) -> None:
    assert parse_bind("localhost:8000", tmp_path) == ("127.0.0.1", 8000, None)


def test_parse_bind_ipv6(tmp_path: Path) -> None:
    assert parse_bind("[::1]:8080", tmp_path) == ("::1", 8080, None)
    assert parse_bind("[::]:80", tmp_path) == ("::", 80, None)


def test_parse_bind_unix_relative_to_bundle(tmp_path: Path) -> None:
    assert parse_bind("unix:relative.sock", tmp_path) == ("", 0, tmp_path / "relative.sock")
    assert parse_bind("unix:run/x.sock", tmp_path) == ("", 0, tmp_path / "run" / "x.sock")


def test_parse_bind_unix_absolute(tmp_path: Path) -> None:
    assert parse_bind("unix:/run/app.sock", tmp_path) == ("", 0, Path("/run/app.sock"))


@pytest.mark.parametrize(
    "bind", ["nonsense", "example.com:80", "127.0.0.1:99999", "unix:", "[::1]:x", "1.2.3:80"]
)
def test_parse_bind_rejects(tmp_path: Path, bind: str) -> None:
    with pytest.raises(ValueError, match=r"HOST:PORT|IP address|0 to 65535|needs a path"):
        parse_bind(bind, tmp_path)


# -- check() ------------------------------------------------------------------------


def test_check_reports_all_problems_of_all_bundles(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    bundles = tmp_path / "bundles"
    make_bundle(bundles / "one", 'entry = "counter"\n')
    make_bundle(bundles / "two", 'entry = "app:App"\nkind = "cgi"\ncolour = 1\n')
    make_bundle(bundles / "three", """
        entry = "missing:App"
        [sockets.main]
        bind = "127.0.0.1:99999"
    """)
    make_bundle(bundles / "good", 'entry = "app:App"\n')
    problems = check(cfg)
    line_for(problems, manifest_prefix(tmp_path, "entry", "one"))
    line_for(problems, manifest_prefix(tmp_path, "kind", "two"))
    line_for(problems, manifest_prefix(tmp_path, "colour", "two"))
    line_for(problems, manifest_prefix(tmp_path, "entry", "three"))
    line_for(problems, manifest_prefix(tmp_path, "sockets.main.bind", "three"))
    assert len(problems) == 5
    assert not any("/good/" in p for p in problems)


def test_check_two_bundles_on_one_address(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    make_bundle(tmp_path / "bundles" / "a", 'entry = "app:App"\n[sockets.main]\n'
                'bind = "127.0.0.1:8200"\n')
    make_bundle(tmp_path / "bundles" / "b", 'entry = "app:App"\n[sockets.web]\n'
                'bind = "localhost:8200"\n')
    problems = check(cfg)
    assert len(problems) == 1
    line = line_for(problems, manifest_prefix(tmp_path, "sockets.web.bind", "b"))
    assert "localhost:8200 is already used by bundle 'a'" in line


def test_check_two_bundles_on_one_unix_path(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, '[bundles.b]\npath = "elsewhere"\n')
    make_bundle(tmp_path / "bundles" / "a", 'entry = "app:App"\n[sockets.main]\n'
                'bind = "unix:/tmp/hotsup-test-shared.sock"\n')
    make_bundle(tmp_path / "elsewhere", 'entry = "app:App"\n[sockets.main]\n'
                'bind = "unix:/tmp/hotsup-test-shared.sock"\n')
    problems = check(cfg)
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path.resolve() / 'elsewhere' / 'bundle.toml'}: "
                                  "sockets.main.bind: ")
    assert "already used by bundle 'a'" in problems[0]


def test_check_port_zero_is_never_a_clash(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    for name in ("a", "b"):
        make_bundle(tmp_path / "bundles" / name, 'entry = "app:App"\n[sockets.main]\n'
                    'bind = "127.0.0.1:0"\n')
    assert check(cfg) == []


def test_check_preload_inside_a_bundle(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, '[supervisor]\npreload = ["json", "counter.models"]\n')
    make_bundle(tmp_path / "bundles" / "counter", 'entry = "counter:Counter"\n',
                module="counter")
    problems = check(cfg)
    assert len(problems) == 1
    line = line_for(problems, cfg_prefix(tmp_path, "supervisor.preload"))
    assert "'counter.models' lives in bundle 'counter'" in line
    assert "cannot be preloaded" in line


def test_check_preload_package_inside_a_bundle(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, '[supervisor]\npreload = ["helpers"]\n')
    make_bundle(tmp_path / "bundles" / "b", 'entry = "app:App"\n')
    write(tmp_path / "bundles" / "b" / "helpers" / "__init__.py", "")
    line = line_for(check(cfg), cfg_prefix(tmp_path, "supervisor.preload"))
    assert "'helpers' lives in bundle 'b'" in line


def test_check_returns_config_problems(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, "[defaults]\nstart_timeout = 0\n")
    problems = check(cfg)
    assert len(problems) == 1
    assert problems[0].startswith(cfg_prefix(tmp_path, "defaults.start_timeout"))


def test_check_missing_config(tmp_path: Path) -> None:
    assert check(tmp_path / "config.toml") == [f"{tmp_path / 'config.toml'}: file not found"]


# -- discover() -------------------------------------------------------------------


def test_discover(tmp_path: Path) -> None:
    make_bundle(tmp_path / "zeta", 'entry = "app:App"\n')
    make_bundle(tmp_path / "alpha", 'entry = "app:App"\n')
    make_bundle(tmp_path / ".hidden", 'entry = "app:App"\n')
    (tmp_path / "no-manifest").mkdir()
    write(tmp_path / "no-manifest" / "app.py", "")
    write(tmp_path / "plain.py", "x = 1\n")
    write(tmp_path / "bundle.toml", 'entry = "app:App"\n')
    (tmp_path / "dir-manifest" / "bundle.toml").mkdir(parents=True)
    make_bundle(tmp_path / "bad name", 'entry = "app:App"\n')
    assert discover(tmp_path) == ["alpha", "zeta"]


def test_discover_missing_dir(tmp_path: Path) -> None:
    assert discover(tmp_path / "absent") == []


def test_discover_empty_dir(tmp_path: Path) -> None:
    assert discover(tmp_path) == []


def test_check_reports_a_module_the_worker_runtime_shadows(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "bundles" / "tk", 'entry = "app:App"\n')
    write(bundle / "token.py", "MINE = True\n")
    write(bundle / "mine.py", "X = 1\n")
    problems = check(make_config(tmp_path))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{bundle / 'token.py'} is shadowed by the module 'token'")


def test_multiprocessing_logging_is_accepted(tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundles" / "mp", 'entry = "app:App"\nmultiprocessing_logging = true\n')
    config = load_config(make_config(tmp_path))
    assert load_bundle(config.sources()["mp"], config).multiprocessing_logging is True


def test_check_reports_a_preload_that_cannot_be_imported(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, '[supervisor]\npreload = ["no_such_module_xyz"]\n')
    problems = check(cfg)
    assert problems == [f"{cfg}: supervisor.preload: cannot import 'no_such_module_xyz': "
                        "ModuleNotFoundError: No module named 'no_such_module_xyz'"]


def test_check_names_a_bundle_directory_it_must_skip(tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundles" / "my bundle", 'entry = "app:App"\n')
    problems = check(make_config(tmp_path))
    assert problems == [f"{tmp_path / 'bundles' / 'my bundle'}: a bundle name may use letters, "
                        "digits, _ . and - (skipped)"]


def test_discover_skips_an_unreadable_directory(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    make_bundle(tmp_path / "ok", 'entry = "app:App"\n')
    make_bundle(tmp_path / "private", 'entry = "app:App"\n')
    real = Path.is_file

    def is_file(self: Path) -> bool:
        if self.parent.name == "private":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    assert discover(tmp_path) == ["ok"]


def test_settings_that_cannot_reach_the_worker_are_config_errors(tmp_path: Path) -> None:
    """The settings go to the worker as JSON: a TOML date, or a table over
    MAX_SETTINGS, is an error naming bundle.toml and the key."""
    from hotsup.supervisor.config import MAX_SETTINGS

    dated = make_bundle(tmp_path / "bundles" / "dated",
                        'entry = "app:App"\n[settings]\nname = "x"\n[settings.when]\n'
                        'day = 1979-05-27\n')
    big = make_bundle(tmp_path / "bundles" / "big", 'entry = "app:App"\n')
    (big / "bundle.toml").write_text(f'entry = "app:App"\n[settings]\nblob = '
                                     f'"{"x" * (MAX_SETTINGS + 1)}"\n')
    problems = check(make_config(tmp_path), probe=False)
    assert sorted(problems) == sorted([
        f"{big / 'bundle.toml'}: settings: {MAX_SETTINGS + 12} bytes as JSON, more than the "
        f"16 MiB a worker receives: put that data in a file the bundle reads",
        f"{dated / 'bundle.toml'}: settings.when.day: a date or time cannot reach the worker: "
        f"write it as a string"]), problems
