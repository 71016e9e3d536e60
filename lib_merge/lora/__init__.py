"""LoRA support: files and their network types (formats), module names → checkpoint keys
(keymap), per-module delta math (delta), binding to a checkpoint (patches), baking one key
(bake), per-block strength (blockweights), extraction (extract), LoRA merging (merge)."""
