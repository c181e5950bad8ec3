"""Benchmarks of lckv-jax: scripts run from the repository root as `python -m benchmarks.<name>`.

Their results are record files in benchmarks/results, one per benchmark and device (`records`);
the tables of README.md and benchmarks/results/*.md are generated from them (`tables`). See
benchmarks/README.md. `lckv_jax` never imports this package.
"""
