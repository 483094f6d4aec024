"""The JSON files that travel beside a bundle's graphs (`manifest.json`, `sam2.json`,
`vlm.json`): written atomically with sorted keys (readable diffs), read back as an object or
refused with a `BundleError` that names the file and the fix."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rau_rt.errors import BundleError


def write_json(path: str | Path, data: dict[str, object]) -> Path:
    """`data` as indented, key-sorted JSON at `path`, replacing it atomically."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)
    return path


def read_json(path: str | Path, missing: str) -> dict[str, object]:
    """The JSON object in `path`.

    Raises:
        BundleError: no such file (the message ends with `missing`: what writes it), not
            JSON, or not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: missing; {missing}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not JSON ({exc}); re-export the bundle") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(data).__name__}; "
                          "re-export the bundle")
    return data
