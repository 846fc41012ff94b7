"""The report as JSON: ``report_data``'s dict, indented, for tools."""

from __future__ import annotations

import json
from typing import Any


def render_json(data: dict[str, Any]) -> str:
    """``data`` as JSON (key order kept, two-space indent); ``json.loads`` gives it back."""
    return json.dumps(data, indent=2)
