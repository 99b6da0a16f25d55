"""Exception types. Every message names the offending file, tensor, shape, dtype or value."""


class FilmFastError(Exception):
    """Base class of film_fast's user-facing errors (the CLI prints them as one line)."""


class CheckpointError(FilmFastError, ValueError):
    """A checkpoint cannot be read or does not fit a FILM model."""


class InputError(FilmFastError, ValueError):
    """An input image, folder or argument is unusable."""
