"""How bundle code is imported: from source, first on the path, never shadowed.

A worker imports its bundle fresh: the zygote it was forked from never imported
bundle code. Two traps remain, and this module closes both:

* A stale ``.pyc``: a file rewritten at the same size within the same second
  passes the mtime-and-size check of its cached bytecode, and the old code
  would be served. Bundle modules are always compiled from source, and no
  bytecode is written into the bundle directory.
* A module the worker runtime already imported (``token``, ``queue``, ``json``
  ...) wins over a bundle file of the same name, silently. ``shadowed()``
  names such files so the load fails with a message instead.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class _SourceOnlyLoader(importlib.machinery.SourceFileLoader):
    """Compiles from source every time and never writes bytecode.

    ``path_stats`` failing makes ``get_code`` skip the bytecode cache, both
    reading and writing it.
    """

    def path_stats(self, path: str) -> dict[str, Any]:
        raise OSError("hotsup: bundle code is always compiled from source")


def install(bundle_dir: Path) -> None:
    """Put the bundle first on sys.path, its modules loaded by _SourceOnlyLoader."""
    root = os.path.realpath(bundle_dir)
    source = (_SourceOnlyLoader, importlib.machinery.SOURCE_SUFFIXES)
    extensions = (
        importlib.machinery.ExtensionFileLoader,
        importlib.machinery.EXTENSION_SUFFIXES,
    )
    make_finder = importlib.machinery.FileFinder.path_hook(extensions, source)

    def hook(entry: str) -> Any:
        if not _under(entry, root):
            raise ImportError("not a bundle path")
        return make_finder(entry)

    sys.path_hooks.insert(0, hook)
    # Only finders the zygote cached for paths in the bundle would bypass the
    # hook; the rest stay (rebuilding them all costs a listdir of every
    # directory on sys.path on the next import, milliseconds per generation).
    for cached in [p for p in sys.path_importer_cache if _under(p, root)]:
        del sys.path_importer_cache[cached]
    sys.path.insert(0, str(bundle_dir))


def _under(entry: str, root: str) -> bool:
    real = os.path.realpath(entry or ".")
    return real == root or real.startswith(root + os.sep)


def resolve(entry: str) -> Any:
    """The object ``module:attribute`` names (the attribute may be dotted).

    A missing attribute is an AttributeError that names bundle.toml's key
    ``entry`` and the module's file: the user's fix is in one or the other.
    An error raised while the module is imported propagates unchanged.
    """
    module_name, _, attribute = entry.partition(":")
    module = importlib.import_module(module_name)
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            where = os.path.basename(getattr(module, "__file__", None) or module_name)
            raise AttributeError(
                f"bundle.toml: entry = {entry!r}: {where} has no attribute {part!r} "
                f"(fix the key entry, or define {part} in {where})") from None
    return target


def top_level_modules(bundle_dir: Path) -> dict[str, str]:
    """The bundle's importable top-level names -> the file or directory that makes them."""
    found: dict[str, str] = {}
    try:
        entries = sorted(os.scandir(bundle_dir), key=lambda e: e.name)
    except OSError:
        return found
    for entry in entries:
        if entry.is_file() and entry.name.endswith(".py"):
            found.setdefault(entry.name[:-3], entry.name)
        elif entry.is_dir() and os.path.isfile(os.path.join(entry.path, "__init__.py")):
            found.setdefault(entry.name, entry.name + "/")
    return found


def loaded_modules() -> dict[str, str | None]:
    """This process's imported modules: name -> file (None if built in)."""
    return {name: getattr(module, "__file__", None) for name, module in sys.modules.items()}


def shadowed(bundle_dir: Path, loaded: Mapping[str, str | None]) -> list[str]:
    """Bundle files whose module name is taken by a module in ``loaded`` (name -> file)."""
    root = os.path.realpath(bundle_dir)
    problems = []
    for name, where in top_level_modules(bundle_dir).items():
        if name not in loaded:
            continue
        origin = loaded[name]
        if origin is not None and os.path.realpath(origin).startswith(root + os.sep):
            continue  # it is the bundle's own (a second import in this process)
        problems.append(f"{bundle_dir / where} is shadowed by the module {name!r} "
                        f"({origin or 'built in'})")
    return problems
