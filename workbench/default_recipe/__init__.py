"""The embedded default model's training recipe (`wb train default`): settings, the two-stage run on the
shared training loop, and installing a finished run as the shipped weights."""
