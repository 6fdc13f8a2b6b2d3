"""prefopt's benchmarks: ``python -m benchmarks`` (see :mod:`benchmarks.run` and docs/performance.md)."""
