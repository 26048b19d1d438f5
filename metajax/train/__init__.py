"""Training: the jitted meta-step, evaluation, run directories and logs."""
