# Follows modules/sd_vae.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
"""modules/sd_vae.py: the VAE list."""
vae_dict = {}


def refresh_vae_list():
    pass
