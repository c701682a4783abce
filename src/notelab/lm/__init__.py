"""LLaMA / Llama 3 decoders: model, presets, FLOPs, generation, Hugging Face checkpoints, pre- and post-training."""

from notelab.lm.chat import apply_chat_template, encode_chat
from notelab.lm.config import PRESETS, LlamaConfig, gpt2_variant, llama_hidden_dim
from notelab.lm.convert import from_hf, to_hf
from notelab.lm.data import PackedStream, load_preference_jsonl, load_sft_jsonl, stdlib_preference_pairs
from notelab.lm.flops import count_parameters, flops_per_token, kv_cache_bytes, mfu, weight_bytes
from notelab.lm.generate import generate, next_token, stream
from notelab.lm.model import Block, Llama
from notelab.lm.posttrain import DPOLoss, dpo, dpo_loss_from_logps, preference_margins, sft, sft_loss
from notelab.lm.sampling import FactualNucleus
from notelab.lm.train import load_run, perplexity, prepare_data, pretrain

__all__ = [
    "PRESETS",
    "Block",
    "DPOLoss",
    "FactualNucleus",
    "Llama",
    "LlamaConfig",
    "PackedStream",
    "apply_chat_template",
    "count_parameters",
    "dpo",
    "dpo_loss_from_logps",
    "encode_chat",
    "flops_per_token",
    "from_hf",
    "generate",
    "gpt2_variant",
    "kv_cache_bytes",
    "llama_hidden_dim",
    "load_preference_jsonl",
    "load_run",
    "load_sft_jsonl",
    "mfu",
    "next_token",
    "perplexity",
    "preference_margins",
    "prepare_data",
    "pretrain",
    "sft",
    "sft_loss",
    "stdlib_preference_pairs",
    "stream",
    "to_hf",
    "weight_bytes",
]
