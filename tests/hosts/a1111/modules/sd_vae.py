# Follows modules/sd_vae.py of A1111 v1.10.1 (tag v1.10.1).
"""modules/sd_vae.py: the VAE list."""
vae_dict = {}


def refresh_vae_list():
    pass
