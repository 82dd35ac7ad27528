"""User-facing errors: each carries a one-line message that names the problem and what to do."""


class WorkbenchError(Exception):
    """An error with a one-line, user-facing message (the CLI prints it without a traceback)."""


class ModelLoadError(WorkbenchError):
    """A model could not be found, loaded, or is not a supported vision-language architecture."""


class InputError(WorkbenchError):
    """An image, prompt or other input the user gave cannot be used."""


class FolderInUse(InputError):
    """A run folder another process is writing (its writer lock is held): never to be deleted or reused."""
