"""Evaluations that score models on held-out data: exact-match VQA accuracy on probe scenes."""
