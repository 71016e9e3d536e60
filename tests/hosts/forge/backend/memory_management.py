# Follows backend/memory_management.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""backend/memory_management.py: free memory as the batching logic sees it (tests can lower it)."""
free_memory_bytes = 1 << 40


def get_free_memory(dev=None, torch_free_too=False):
    return free_memory_bytes
