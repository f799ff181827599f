"""The evidence benchmark: checkpoint trajectories on Fashion-MNIST, label-free selectors compared
side by side with the alternatives a user has, and the report in docs/benchmarks.md.

Run ``python -m benchmarks.evidence --help``.
"""
