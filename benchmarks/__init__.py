"""prefopt's benchmarks: ``python -m benchmarks`` (see :mod:`benchmarks.run` and the README section "Performance")."""
