import os

# Float32 matmuls at full precision on every backend, so reference comparisons are meaningful.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
