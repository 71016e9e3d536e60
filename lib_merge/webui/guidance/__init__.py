"""The Untitled & Guidance script's WebUI side (the math and the stack are host-free, in
``lib_merge.guidance``).

- controls, args, infotext, paste, legacy, ui, xyz: the script's controls and everything that
  reads or writes their values (API args, infotext and paste with the legacy keys of other
  extensions, the gradio layout, X/Y/Z axes); ``console`` holds its console lines;
- guided_pass, pass_setup, pass_summary, untitled_conds: one sampling pass, host-neutral;
- a1111, a1111_pass: the A1111 1.10 adapter; forge (installing) and forge_patches (the functions
  it registers on the U-Net patcher): the Forge adapter; cfgpp_samplers: our
  CFG++ samplers in either host's sampler list.
"""
from __future__ import annotations


def host_adapter():
    """The adapter module of the running host, ``forge`` or ``a1111``; both expose
    ``prepare_sampling``, ``finish``, ``register_samplers`` and ``new_generation``."""
    from ..hosts.detect import is_forge

    if is_forge():
        from . import forge

        return forge
    from . import a1111

    return a1111
