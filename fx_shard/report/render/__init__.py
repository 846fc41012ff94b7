"""The report's renderers, one per format: ``RENDERERS[format](report_data(model))``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fx_shard.report.render.github import GithubRenderer
from fx_shard.report.render.json import render_json
from fx_shard.report.render.markdown import MarkdownRenderer
from fx_shard.report.render.text import TextRenderer

__all__ = ["FORMATS", "RENDERERS"]

#: Format name -> what turns ``report_data``'s dict into the report's text.
RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "text": TextRenderer().render,
    "markdown": MarkdownRenderer().render,
    "github": GithubRenderer().render,
    "json": render_json,
}
FORMATS: tuple[str, ...] = tuple(RENDERERS)
