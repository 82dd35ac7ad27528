"""The `wb` root: the top floor, which mounts every floor's commands into one command line. Nothing imports it."""
