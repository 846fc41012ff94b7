"""Shared test set-up.

Tests under ``tests/spmd`` need an XLA runtime with a fixed device count, so
this process never starts one: ``test_spmd.py`` runs that folder in a child
pytest per mesh size (2, 4, 8), with ``FX_SHARD_DEVICES`` set.
"""

import os

collect_ignore = [] if os.environ.get("FX_SHARD_DEVICES") else ["spmd"]


def pytest_collection_finish(session):
    """Start the spmd children once they are known to run: they compile while this process runs its own tests."""
    counts = sorted({item.callspec.params["devices"] for item in session.items if item.path.name == "test_spmd.py"})
    if counts and not session.config.option.collectonly:
        from tests.test_spmd import Child

        session.config.fx_shard_spmd_children = {n: Child(n) for n in counts}


def pytest_unconfigure(config):
    for child in getattr(config, "fx_shard_spmd_children", {}).values():
        child.close()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The spmd children's own counts (test_spmd.py runs each as one test)."""
    results = getattr(config, "fx_shard_spmd_results", None)
    if results:
        terminalreporter.section("tests/spmd in child processes")
        for devices, summary in sorted(results.items()):
            terminalreporter.write_line(f"{devices} devices: {summary}")
