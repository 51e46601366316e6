"""blockdistill: blockwise parallel distillation of decoder-only transformers."""

import importlib.metadata

from ._attention import Attention as Attention, RMSNorm as RMSNorm
from ._config import RopeScaling as RopeScaling, TransformerConfig as TransformerConfig
from ._layer import MLP as MLP, DecoderLayer as DecoderLayer
from ._model import ModelOutput as ModelOutput, Transformer as Transformer
from ._stack import LayerStack as LayerStack, LayerStates as LayerStates
from ._teacher import Teacher as Teacher

try:
    __version__ = importlib.metadata.version("blockdistill")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Attention",
    "DecoderLayer",
    "LayerStack",
    "LayerStates",
    "MLP",
    "ModelOutput",
    "RMSNorm",
    "RopeScaling",
    "Teacher",
    "Transformer",
    "TransformerConfig",
]
