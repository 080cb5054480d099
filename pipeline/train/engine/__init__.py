"""The training engine: models, the step, parallelism, checkpoints, export, validation, memory plan."""
