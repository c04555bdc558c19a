"""Studies and internal recipes (not part of the package or the test suite); see ``experiments/README.md``."""
