"""Training of FILM: data pipeline, losses, TensorBoard logging."""
