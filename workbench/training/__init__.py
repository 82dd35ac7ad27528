"""Training: one loop and one checkpoint stack for every model the workbench trains.

`loop` runs a plan of steps with accelerate, seeded and resumable; `checkpoints` writes and restores
safetensors checkpoints; `optimisation` holds the settings every recipe optimises with;
`sequences`, `features` and `batches` turn probe scenes into supervised micro-batches over cached
vision features; `lora` and `metrics` are the pieces every recipe's run folder uses.
"""
