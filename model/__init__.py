"""Relaxed Recursive Transformers with adaptive depth: build, run, trace, train.

Public API::

    from model import load_model, recursify, generate, stream
    from model.policies import FixedDepth, Confidence, Saturation
"""
from .checkpoint import ModelLoadError, load_model, load_tokenizer, save_checkpoint
from .config import RecursiveConfig
from .engine import EngineInputError, generate, stream
from .modeling import RecursiveForCausalLM
from .recursify import recursify
from .trace import GenerationTrace, LoopSignal, TokenStep

__all__ = [
    "EngineInputError", "GenerationTrace", "LoopSignal", "ModelLoadError", "RecursiveConfig",
    "RecursiveForCausalLM", "TokenStep", "generate", "load_model", "load_tokenizer", "recursify",
    "save_checkpoint", "stream",
]
