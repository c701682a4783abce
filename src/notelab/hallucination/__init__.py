"""Hallucination detection, benchmarks and mitigations on local models (issue 16).

Everything takes a :class:`LanguageModel` (``protocol``): ``generate`` and ``logprobs``; the backends
(``backends``) wrap a notelab Llama (:class:`NotelabLM`), a transformers causal LM from a local folder
(:class:`TransformersLM`) and an OpenAI-compatible HTTP endpoint such as ``notelab lm serve``
(:class:`OpenAICompatLM`).
"""

from notelab.hallucination.backends import EndpointError, NotelabLM, OpenAICompatLM, TransformersLM
from notelab.hallucination.protocol import Generation, LanguageModel, Scored

__all__ = [
    "EndpointError",
    "Generation",
    "LanguageModel",
    "NotelabLM",
    "OpenAICompatLM",
    "Scored",
    "TransformersLM",
]
