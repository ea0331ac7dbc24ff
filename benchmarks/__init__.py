"""dschat's benchmarks: run with ``python -m benchmarks [--quick]`` from the repository root."""
