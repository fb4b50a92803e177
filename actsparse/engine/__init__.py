"""A compact batch-1 decode engine (gpt-fast style) with dense and sparse linear layers.

``model.py``: the model (config, KV cache, GQA attention, gated MLP, RMSNorm, RoPE, dense or
sparse ``Linear``). ``load.py``: Hugging Face folders/models and random named shapes.
``generate.py``: prefill + CUDA-graph decode, calibration of thresholds, the one-call ``generate``.
"""

from .generate import GenerationStats, Generator, generate, generate_from_hf, sample
from .load import engine_from_hf_model, hf_config, hf_model_from_engine, load_hf, random_model
from .model import NAMED_CONFIGS, ModelArgs, Transformer

__all__ = [
    "GenerationStats", "Generator", "ModelArgs", "NAMED_CONFIGS", "Transformer", "engine_from_hf_model",
    "generate", "generate_from_hf", "hf_config", "hf_model_from_engine", "load_hf", "random_model", "sample",
]
