"""One stand-in tree per host: ``a1111/`` (A1111 v1.10.1) and ``forge/`` (Forge, commit dfdcbab6),
each holding the real module paths once, used by the Merge Board's and the guidance's tests alike.

Each file follows the real source it names on its first line (``git show v1.10.1:<path>`` in the
A1111 mirror, ``git show dfdcbab6:<path>`` in the Forge mirror) in the parts the tests use,
rewritten small. ``installed("a1111" | "forge")`` puts one host's top-level packages on
``sys.path`` for a test and removes every trace afterwards. Code the two hosts ship alike is
written once: Forge's stand-ins import A1111's where Forge kept A1111's code, host-neutral pieces
are in ``common/``, and code with module state of its own is in ``shared_src/``, run inside each
host's module by ``common.exec_shared``.
"""
from tests.hosts.install import guidance_runner, installed, load_entry_script, load_script, load_xyz_grid  # noqa: F401
