def refresh_models():
    from modules import sd_models

    sd_models.list_models()
    return [], []
