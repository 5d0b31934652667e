"""Stage 2, place: neuron orders that store co-activated neurons side by side, their read cost and timing."""
