"""The report as markdown: pipe tables, ``#`` headings, code spans, markdown's specials escaped."""

from __future__ import annotations

import re

from fx_shard.report.render.base import Renderer


class MarkdownRenderer(Renderer):
    """For a markdown file (docs/reports): pipe tables with alignment rows."""

    tablefmt = "pipe"

    def title(self, text: str) -> list[str]:
        return self.heading(self.prose(text), 1)

    def heading(self, text: str, level: int = 2) -> list[str]:
        return ["#" * level + " " + text, ""]

    def code(self, text: str) -> str:
        if not text:
            return ""
        return f"`{text}`".replace("|", "\\|")

    def prose(self, text: str) -> str:
        return re.sub(r"([\\*_|<>\[\]`])", r"\\\1", text)
