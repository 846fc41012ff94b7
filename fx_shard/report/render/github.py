"""The report as GitHub-flavoured markdown: markdown's, with tabulate's GitHub tables."""

from __future__ import annotations

from fx_shard.report.render.markdown import MarkdownRenderer


class GithubRenderer(MarkdownRenderer):
    """For a pull request or an issue: tables without alignment colons."""

    tablefmt = "github"
