"""Relaxed Recursive Transformers with adaptive depth: build, run, trace, train.

Public API::

    from model import load_model, recursify, generate, stream
    from model.inference.policies import FixedDepth, Confidence, Saturation
"""
from model.io.checkpoint import load_model, load_tokenizer, save_checkpoint
from model.definition.config import RecursiveConfig
from model.errors import DataError, EngineFullError, EngineInputError, LabError, ModelLoadError, ModelSaveError, TraceFormatError
from model.inference.generation import generate, stream
from model.definition.modeling import RecursiveForCausalLM
from model.conversion.recursify import recursify
from model.inference.trace import GenerationTrace, LoopSignal, TokenStep

__all__ = [
    "DataError", "EngineFullError", "EngineInputError", "GenerationTrace", "LabError", "LoopSignal",
    "ModelLoadError", "ModelSaveError", "RecursiveConfig", "RecursiveForCausalLM", "TokenStep", "generate", "load_model",
    "load_tokenizer", "recursify", "save_checkpoint", "stream", "TraceFormatError",
]
