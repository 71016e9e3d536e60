# Stands in for the package k_diffusion/ of Forge dfdcbab685e5, a namespace package there (no __init__.py).
from . import external, sampling  # noqa: F401
