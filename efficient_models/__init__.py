"""Efficient models (HiDrop, ViCA, SkipGPT, layer fusion, streaming GPE, on-policy SFT), one module
per method, with a shared training loop and benchmark harness."""
