"""Trainers of the embedded world's own models: the miniature SD's VAE and UNet, and the evaluator."""
