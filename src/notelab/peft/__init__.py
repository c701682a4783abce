"""Parameter-efficient fine-tuning on any ``nn.Module``: LoRA, IA3, BitFit, bottleneck adapters, prompt and prefix
tuning.

Adapters are injected by module name (``target_modules``), wrap the frozen ``base_layer``, can be
switched, disabled, merged and unloaded (:class:`PeftModel`), and are saved in Hugging Face PEFT's
file layout (``notelab.peft.files``). ``notelab.peft.estimate`` counts the memory of a fine-tuning run.
This package never imports another family: prefix tuning reaches an attention module through its
``kv_prefix`` hook slot.
"""

from notelab.peft.config import (
    BitFitConfig,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    config_for,
    houlsby,
    pfeiffer,
)
from notelab.peft.files import load_adapter, save_adapter
from notelab.peft.model import PeftModel, get_peft_model, inject
from notelab.peft.tuners import count_parameters, find_targets, mark_only_adapters_trainable

__all__ = [
    "BitFitConfig",
    "BottleneckConfig",
    "IA3Config",
    "LoraConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "config_for",
    "count_parameters",
    "find_targets",
    "get_peft_model",
    "houlsby",
    "inject",
    "load_adapter",
    "mark_only_adapters_trainable",
    "pfeiffer",
    "save_adapter",
]
