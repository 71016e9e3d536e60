"""modules/sd_vae.py: the VAE list."""
vae_dict = {}


def refresh_vae_list():
    pass
