# Follows modules/sd_unet.py of A1111 v1.10.1 (tag v1.10.1).
current_unet = None
