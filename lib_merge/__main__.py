"""``python -m lib_merge``: see lib_merge.cli."""
from .cli import main

raise SystemExit(main())
