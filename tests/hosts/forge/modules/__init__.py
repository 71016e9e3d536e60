# Stands in for the package modules/ of Forge dfdcbab685e5, a namespace package there (no __init__.py).

