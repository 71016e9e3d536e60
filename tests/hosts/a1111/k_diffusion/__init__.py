# Follows k_diffusion/__init__.py of the k-diffusion checkout A1111 v1.10.1 (tag v1.10.1) pins (repositories/k-diffusion).
from . import external, sampling  # noqa: F401
