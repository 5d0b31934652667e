"""Shared file formats and records: GGUF reading and writing, ggml type names, the sidecar and its
bundle layout, co-activation stats, the placement record, atomic output files, sizes."""
