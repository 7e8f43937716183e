"""What the benchmark scripts share, one concept per module (bench/README.md lists them)."""
