"""Batch analyses over a model and an image set (token categories, patch probes, layer alignment,
inter-layer similarity, interventions), each writing to the run store."""
