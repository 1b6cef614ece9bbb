"""Small, download-free examples used by the demo, the tests and the benchmarks."""
