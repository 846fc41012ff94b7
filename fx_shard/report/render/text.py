"""The report as plain text: ``tabulate``'s simple tables, headings underlined, nothing escaped."""

from __future__ import annotations

from fx_shard.report.render.base import Renderer


class TextRenderer(Renderer):
    """For a terminal or a log: what ``report(model)`` prints by default."""

    tablefmt = "simple"

    def title(self, text: str) -> list[str]:
        return [text, ""]

    def heading(self, text: str, level: int = 2) -> list[str]:
        return [text, ("=" if level <= 2 else "-") * len(text), ""]

    def code(self, text: str) -> str:
        return text

    def prose(self, text: str) -> str:
        return text
