"""Stage 5, evaluate: perplexity and density sweeps, benchmarks against stock llama.cpp, memory caps."""
