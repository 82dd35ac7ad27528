"""Training recipes: reproducible, resumable runs that produce the weights the workbench ships.

`default_model` trains the embedded default model (projector, then projector + LoRA) on probe
scenes, LLaVA-1.5 style, within an hour on two CPU cores; `sequences` turns probe-scene captions
and question/answer pairs into tokenised chat conversations with answer-only labels.
"""
