"""Benchmarks that print tables: neuralink against stock llama.cpp, side by side in one run.

Speed on shared machines is noisy, so every benchmark interleaves the
variants it compares and reports ratios next to absolute numbers.
"""
