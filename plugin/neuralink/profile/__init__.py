"""Stage 1, profile: which FFN neurons a model activates, token by token, over calibration text."""
