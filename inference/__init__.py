"""Sampling a trained model: load a run's pipeline or a checkpoint's UNet, generate, write images with metadata."""
