"""asv benchmarks: performance of the harness over commits (``asv run``; see README, "Performance over time").

Each benchmark is parametrized over the method registry, so a new method is benchmarked the moment
it registers, as the contract tests test it.
"""
