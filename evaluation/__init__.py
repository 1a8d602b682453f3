"""Evaluation of a fine-tuned pipeline: held-out captions and images in, FID and CLIP score out (evaluate.py)."""
