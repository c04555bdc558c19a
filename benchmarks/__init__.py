"""Benchmarks a user reruns, each a module run from the repository root: ``python -m benchmarks.NAME --help``.

Their current results, with the CPU and the command of each, are in ``benchmarks/README.md``; ``common`` is
the helper they share. Studies whose result is recorded live in ``experiments/``.
"""
