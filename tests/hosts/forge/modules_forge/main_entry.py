# Follows modules_forge/main_entry.py of Forge dfdcbab685e5 (lllyasviel/stable-diffusion-webui-forge).
def refresh_models():
    from modules import sd_models

    sd_models.list_models()
    return [], []
