"""``python -m hotsup.worker.probe PATH ENTRY``: import a bundle's entry as a worker
would, and serve nothing.

``hotsup check`` runs this in a throwaway interpreter per bundle, so bundle code
never runs inside the checking process and a hung or crashing import costs
only this process. It installs the bundle's importer (source only, the bundle
first on sys.path), imports the entry's module and looks the attribute up; it
never calls the entry (no ``Entry(ctx)``, no factory, no ``start()``).

The result is one JSON object on stdout: ``{"error": null}``, or ``{"error":
"Type: message", "file": str | null, "line": int | null}`` with the bundle's
own file and line where the error was raised. Exit status 0 or 1.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from . import importer


def probe(path: Path, entry: str) -> dict[str, Any]:
    """Import ``entry`` from the bundle at ``path``: the outcome as described above."""
    importer.install(path)
    try:
        target = importer.resolve(entry)
    except BaseException as exc:  # the bundle's error, whatever it is, is the answer
        file, line = _where(exc, path)
        text = f"{type(exc).__name__}: {exc.msg if isinstance(exc, SyntaxError) else exc}"
        return {"error": text.splitlines()[0], "file": file, "line": line}
    if not callable(target):
        return {"error": f"bundle.toml: entry = {entry!r} names {type(target).__name__} "
                         f"{target!r}, which cannot be called", "file": None, "line": None}
    return {"error": None}


def _where(exc: BaseException, path: Path) -> tuple[str | None, int | None]:
    """The bundle's file and line an error comes from: a SyntaxError's own, else the
    innermost traceback frame inside the bundle directory."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return exc.filename, exc.lineno
    root = os.path.realpath(path) + os.sep
    inside = [frame for frame in traceback.extract_tb(exc.__traceback__)
              if os.path.realpath(frame.filename).startswith(root)]
    if inside:
        return inside[-1].filename, inside[-1].lineno
    return None, None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m hotsup.worker.probe PATH ENTRY", file=sys.stderr)
        return 2
    # The answer goes on a private copy of stdout; the bundle's own prints at
    # import time go to stderr, so they cannot corrupt the JSON line.
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    result = probe(Path(argv[0]), argv[1])
    answer.write(json.dumps(result) + "\n")
    answer.close()
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
