"""Small stand-ins of the A1111 v1.10.1 and Forge (main) modules our adapters touch.

Each follows the real source (``git show v1.10.1:modules/...`` in the A1111 mirror, ``HEAD:...``
in the Forge mirror) in the parts we use, rewritten small; nothing else of the hosts is here.
``host.installed("a1111" | "forge")`` puts one host's ``modules``/``backend``/``k_diffusion``
packages on ``sys.path`` for a test and removes every trace afterwards. Code the two hosts ship
alike is written once: Forge's stand-ins import A1111's where Forge kept A1111's code, host-neutral
pieces are in ``common/``, and code with module state of its own is in ``shared_src/``, run inside
each host's module by ``common.exec_shared``.
"""
