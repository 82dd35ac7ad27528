"""`wb bench`: variants against dense on the same inputs, accuracy beside counted FLOPs and measured speed.

Split by job: `variants` builds the named variants from the registry, `probe_inputs` makes the fixed
batches, `timing` measures prefill, decode, a training step and memory through the `BenchVariant`
interface, `harness` runs it all, and `results` holds the report (table, JSON, plot).
"""
