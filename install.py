"""Run by A1111 / Forge at launch (launch_utils.run_extension_installer) with the WebUI root on
sys.path. Installs only what the WebUI lacks, through the launcher's own pip wrapper; it never
imports lib_merge (whose imports need these very packages)."""
import launch

# (import name, pip requirement). Both WebUIs ship all of these today; the check guards against
# a stripped environment without ever touching the WebUI's pinned versions when present.
REQUIREMENTS = [
    ("safetensors", "safetensors>=0.4.2"),
    ("numpy", "numpy"),
    ("tqdm", "tqdm"),
]

for module, requirement in REQUIREMENTS:
    if not launch.is_installed(module):
        launch.run_pip(f'install "{requirement}"', f"sd-webui-mergeboard requirement: {requirement}")
