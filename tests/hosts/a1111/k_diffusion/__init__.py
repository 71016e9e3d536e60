from . import external, sampling  # noqa: F401
