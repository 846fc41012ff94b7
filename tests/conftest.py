"""Shared test set-up.

Tests under ``tests/spmd`` need an XLA runtime with a fixed device count, so
this process never starts one: ``test_spmd.py`` runs that folder in a child
pytest per mesh size (2, 4, 8), with ``FX_SHARD_DEVICES`` set.
"""

import os

collect_ignore = [] if os.environ.get("FX_SHARD_DEVICES") else ["spmd"]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The spmd children's own counts (test_spmd.py runs each as one test)."""
    results = getattr(config, "fx_shard_spmd_results", None)
    if results:
        terminalreporter.section("tests/spmd in child processes")
        for devices, summary in sorted(results.items()):
            terminalreporter.write_line(f"{devices} devices: {summary}")
