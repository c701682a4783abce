"""LLaMA / Llama 3 decoders: model, presets, FLOPs, generation and Hugging Face checkpoints."""

from notelab.lm.config import PRESETS, LlamaConfig, gpt2_variant, llama_hidden_dim
from notelab.lm.convert import from_hf, to_hf
from notelab.lm.flops import count_parameters, flops_per_token, kv_cache_bytes, mfu, weight_bytes
from notelab.lm.generate import generate, next_token, stream
from notelab.lm.model import Block, Llama

__all__ = [
    "PRESETS",
    "Block",
    "Llama",
    "LlamaConfig",
    "count_parameters",
    "flops_per_token",
    "from_hf",
    "generate",
    "gpt2_variant",
    "kv_cache_bytes",
    "llama_hidden_dim",
    "mfu",
    "next_token",
    "stream",
    "to_hf",
    "weight_bytes",
]
