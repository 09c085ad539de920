"""The one exception type for mistakes a user can fix (bad config, bad input file).

The CLI turns it into a one-line message and exit code 2; everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


class UserError(ValueError):
    """A problem with the user's input, reported without a traceback."""


def read_document(path: str | Path, kind: str, missing: str) -> Any:
    """The parsed ``kind`` (``"JSON"`` or ``"YAML"``) file at ``path``. A missing file raises
    ``UserError(missing)``; one that does not parse raises ``<path>: not valid <kind> (<parser's first line>)``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(missing)
    text = path.read_text()
    try:
        return json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not valid {kind} ({str(e).splitlines()[0]})") from None


def unpickler_reason(e: Exception) -> str:
    """The one informative line of torch's ``weights_only`` refusal (e.g. "Unsupported global: GLOBAL io.open")."""
    for line in str(e).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip().split(". ")[0]
    return "weights_only=True"
