"""Efficient models, one folder per method, each registering itself with `registry`.

Methods: `hidrop`, `fastv`, `pdrop`, `injection`, `prune`, `vica` (config only, so far) and `fusion` (no
training yet); shared parts: the token-schedule engine (`token_schedule/`), the bench variant interface
(`variant`), the benchmark harness (`bench/`), config export from analysis runs (`export`) and the commands
(`method_commands`).
"""
