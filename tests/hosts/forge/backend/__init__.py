# Stands in for the package backend/ of Forge dfdcbab685e5, a namespace package there (no __init__.py).

