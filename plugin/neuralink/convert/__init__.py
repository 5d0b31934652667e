"""Stage 3, convert: the permuted GGUF and its sidecar bundle store, the profile -> place -> convert
pipeline, and the low-rank activity predictor fitted on the way."""
