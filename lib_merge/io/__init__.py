"""Checkpoint I/O: lazy readers, the streaming writer, safe unpickling and hashes."""
from .reader import CheckpointReader, SafetensorsReader, TensorInfo, open_checkpoint
from .writer import SafetensorsWriter

__all__ = ["CheckpointReader", "SafetensorsReader", "SafetensorsWriter", "TensorInfo", "open_checkpoint"]
