"""Bundle directories that are not what they should be (issue 11, finding 9):
a symlink loop, a file name that is not UTF-8, a directory linked to a huge
tree. Each is an error naming the path and what is wrong, the other bundles
serve on, and nothing hangs. Real supervisors."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
from harness import Hotsup, counter_source, free_port, request, save, wait_for, write_bundle
from hotsup.supervisor import watcher

pytestmark = pytest.mark.timeout(90)

MakeHotsup = Callable[..., Hotsup]


def _state(sup: Hotsup, name: str, wanted: str) -> dict[str, object]:
    found: dict[str, object] = {}

    def reached() -> bool:
        found.update(sup.status().get(name, {}))
        return found.get("state") == wanted

    wait_for(reached, what=f"{name} to be {wanted}")
    return found


def test_a_symlink_loop_is_an_error_naming_it(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    good = free_port()
    write_bundle(sup.bundles / "good", counter_source("v0"), good)
    bad = write_bundle(sup.bundles / "bad", counter_source("v0"), free_port())
    (bad / "one").symlink_to("two")
    (bad / "two").symlink_to("one")
    done = sup.cli("check", str(sup.config))
    assert done.returncode == 1
    assert f"{bad / 'one'}: a symlink loop (two leads back to itself): remove it" \
        in done.stdout + done.stderr, done.stdout + done.stderr

    sup.start_serving("good")
    now = _state(sup, "bad", "failed")
    assert f"{bad / 'one'}: a symlink loop" in str(now["last_error"]), now["last_error"]
    assert request(good).startswith("count=1 generation=1")
    (bad / "one").unlink()  # fixed: the next look starts it
    sup.wait_log(r"bad@1: serving")
    assert sup.stop() == 0


def test_a_file_name_that_is_not_utf8_fails_the_swap_not_the_watcher(hotsup: MakeHotsup) -> None:
    sup = hotsup()
    port = free_port()
    bundle = write_bundle(sup.bundles / "counter", counter_source("v0"), port)
    sup.start_serving("counter")
    assert request(port).startswith("count=1 generation=1")
    name = os.fsencode(bundle) + b"/caf\xe9.py"
    with open(name, "w") as handle:
        handle.write("X = 1\n")
    sup.wait_log(r"caf\\xe9\.py: the file name is not valid UTF-8: rename it")
    now = sup.status()["counter"]
    assert now["state"] == "running" and now["generation"] == 1, now
    assert "not valid UTF-8" in str(now["last_error"])
    assert request(port).startswith("count=2 generation=1"), "the old generation serves on"
    os.unlink(name)
    save(bundle / "counter.py", counter_source("v1"))  # the watcher still sees changes
    sup.wait_log(r"counter@2: swapped from counter@1")
    assert request(port).startswith("count=3 generation=2 tag=v1")
    assert sup.stop() == 0


def test_a_bundle_linked_to_a_huge_tree_fails_at_the_limit_and_shutdown_is_quick(
        hotsup: MakeHotsup, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A bundle directory that is a symlink to a tree of more files than a
    digest looks at (as one to ``/`` is): the bundle fails naming the limit,
    at once, and nothing keeps hashing."""
    sup = hotsup()
    good = free_port()
    write_bundle(sup.bundles / "good", counter_source("v0"), good)
    huge = write_bundle(tmp_path_factory.mktemp("huge") / "tree", counter_source("v0"),
                        free_port())
    for i in range(watcher.MAX_FILES):
        (huge / f"f{i}").touch()
    (sup.bundles / "huge").symlink_to(huge)
    sup.start_serving("good")
    now = _state(sup, "huge", "failed")
    assert f"more than {watcher.MAX_FILES} files (the limit of a bundle's digest)" \
        in str(now["last_error"]), now["last_error"]
    assert request(good).startswith("count=1 generation=1")
    started = time.monotonic()
    assert sup.stop() == 0
    took = time.monotonic() - started
    assert took < 10, f"shut-down took {took:.1f}s"


def test_settings_a_worker_cannot_receive_fail_the_bundle_naming_the_key(
        hotsup: MakeHotsup) -> None:
    """A TOML date in [settings] cannot travel as JSON: the bundle fails with
    a config error naming bundle.toml and the key, not an internal error,
    and is not left starting."""
    sup = hotsup()
    good = free_port()
    write_bundle(sup.bundles / "good", counter_source("v0"), good)
    bad = write_bundle(sup.bundles / "bad", counter_source("v0"), free_port(),
                       extra="[settings]\nday = 1979-05-27\n")
    sup.start_serving("good")
    now = _state(sup, "bad", "failed")
    assert f"{bad / 'bundle.toml'}: settings.day: a date or time cannot reach the worker" \
        in str(now["last_error"]), now["last_error"]
    assert request(good).startswith("count=1 generation=1")
    assert sup.stop() == 0
