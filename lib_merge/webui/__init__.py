"""WebUI glue (A1111 and Forge). The only package allowed to import gradio or the host's ``modules``,
and only inside functions, so importing it outside a WebUI works."""
