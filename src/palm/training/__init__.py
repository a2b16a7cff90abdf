"""Training: the trainer, data-parallel processes and cross-validation."""
