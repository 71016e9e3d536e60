# Stands in for the package modules_forge/ of Forge dfdcbab685e5, a namespace package there (no __init__.py).

