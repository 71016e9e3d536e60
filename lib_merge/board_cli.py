"""``python -m lib_merge board``: the Merge Board in its own gradio app over a models folder.

Wired into ``lib_merge.cli`` with two lines (in ``build_parser`` and ``main``)::

    board_cli.add_parser(sub)
    if args.command == "board": return board_cli.run(args)
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "board",
        help="serve the Merge Board over a models folder (default: the demo folder)",
        description="Serve the Merge Board (block sliders, presets, plots, A-vs-B heatmap, save with the "
        "streaming engine) over a folder of checkpoints. alpha is B's share: 0 gives A, 1 gives B. "
        "Needs gradio (3.41 or 4.x).",
    )
    p.add_argument("--models-dir", type=Path, help="folder of .safetensors/.ckpt checkpoints; merged files are saved "
                   "here too (default: demo_models, filled with small synthetic models on first use)")
    p.add_argument("--lora-dir", type=Path, help="folder of LoRAs for Save and Extract LoRA (default: the loras "
                   "subfolder of the models folder)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7870, help="port (default 7870)")
    p.add_argument("--open", action="store_true", help="open a browser tab")
    return p


def run(args: argparse.Namespace) -> int:
    # Only asks whether gradio is installed: the core never imports it (lib_merge.webui does).
    if importlib.util.find_spec("gradio") is None:
        print("error: the board needs gradio: pip install 'gradio==4.40.0' (or 3.41.2)")
        return 2
    from .webui.board.standalone import launch

    launch(args.models_dir, host=args.host, port=args.port, open_browser=args.open, block=True,
           lora_dir=getattr(args, "lora_dir", None))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib_merge.board_cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return run(parser.parse_args(["board", *(argv or [])]) if argv is not None else parser.parse_args(["board"]))


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
