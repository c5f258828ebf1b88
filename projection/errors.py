"""The one error type the core raises for bad input: its message names the file, key or value at fault."""


class ProjectionError(ValueError):
    pass
