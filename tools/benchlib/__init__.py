"""Shared code of tools/bench: the VMMs compared, the scenarios they run in the
test host, statistics, and the comparison report."""
