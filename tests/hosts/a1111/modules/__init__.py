# Stands in for the package modules/ of A1111 v1.10.1 (tag v1.10.1), a namespace package there (no __init__.py).
