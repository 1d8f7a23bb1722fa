"""Attention transfer: models, losses, data and the training loop."""
