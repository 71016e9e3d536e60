"""The Merge Board's WebUI side: a gradio tab (or a standalone app) over the host's checkpoints.

- ui: layout and wiring; base, sync, actions: the handlers (recipe from the controls, controls
  kept in step, live session / preview / compare / save / load); plots: the figures;
  gradio_compat: the only place that knows gradio 3.41 from 4.x; assets: the browser script;
- host: the Host protocol and the live-preview session between the host's hooks and
  ``lib_merge.live``; host_a1111 (with a1111_text for its text encoders), host_forge, standalone:
  the three hosts; xyz: the X/Y/Z axes that vary the merge.
"""
