"""Worker side: the MoE model, data, and training loop."""
