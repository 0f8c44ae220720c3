"""Where a supervisor's run_dir is: ``[supervisor] run_dir`` of its config.toml.

The commands to a running supervisor need nothing else of the config, even
when another key is broken, and they need it fast: ``config`` validates
everything and imports far more (a ``hotsup status`` is a fresh process each
time). ``config`` takes the default and the resolution from here.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

#: run_dir when config.toml does not say, relative to config.toml's directory.
DEFAULT = ".hotsup"


class RunDirError(Exception):
    """config.toml cannot say where its run_dir is; the message names the file
    (and the key) and the problem, as ``config``'s problem lines do."""


def resolve(config_dir: Path, run_dir: str) -> Path:
    """``run_dir`` as config.toml in ``config_dir`` means it, normalised (``a/../b``
    is ``b``: paths are compared by prefix)."""
    return Path(os.path.normpath(config_dir / run_dir))


def run_dir_of(path: Path) -> Path:
    """The run_dir config.toml at ``path`` names, reading nothing else of it."""
    path = path.resolve() if path.exists() else path.absolute()
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise RunDirError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise RunDirError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise RunDirError(f"{path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: cannot read: {exc}") from None
    sup = data.get("supervisor", {})
    if not isinstance(sup, dict):
        raise RunDirError(f"{path}: supervisor: expected a table, got {_describe(sup)}")
    run_dir = sup.get("run_dir", DEFAULT)
    if not isinstance(run_dir, str):
        raise RunDirError(f"{path}: supervisor.run_dir: expected a string, got "
                          f"{_describe(run_dir)}")
    return resolve(path.parent, run_dir)


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
