"""Reproduce THEORY.md on regularized logistic regression: `spikeguard reproduce`.

Nothing is imported here, so that ``spikeguard --help`` (which loads this package's
``cli`` module) stays fast; use :mod:`spikeguard.reproduce.problems` and
:mod:`spikeguard.reproduce.experiments` directly.
"""
