"""Relaxed Recursive Transformers with adaptive depth: build, run, trace, train.

Public API::

    from model import load_model, recursify, generate, stream
    from model.policies import FixedDepth, Confidence, Saturation
"""
from .checkpoint import load_model, load_tokenizer, save_checkpoint
from .config import RecursiveConfig
from .errors import DataError, EngineFullError, EngineInputError, LabError, ModelLoadError, ModelSaveError, TraceFormatError
from .generation import generate, stream
from .modeling import RecursiveForCausalLM
from .recursify import recursify
from .trace import GenerationTrace, LoopSignal, TokenStep

__all__ = [
    "DataError", "EngineFullError", "EngineInputError", "GenerationTrace", "LabError", "LoopSignal",
    "ModelLoadError", "ModelSaveError", "RecursiveConfig", "RecursiveForCausalLM", "TokenStep", "generate", "load_model",
    "load_tokenizer", "recursify", "save_checkpoint", "stream", "TraceFormatError",
]
