"""Prints the fuzz suite's counts (cases, clean errors, successes, failures per target) after the run."""
from __future__ import annotations


def pytest_terminal_summary(terminalreporter):
    import harness
    lines = harness.summary_lines()
    if lines:
        terminalreporter.section("fuzz summary")
        for line in lines:
            terminalreporter.write_line(line)
