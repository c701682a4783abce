"""What every part of :mod:`notelab.hallucination` needs from a language model, and nothing more.

Detectors, benchmarks and mitigations take any object with these two methods; the backends
(:mod:`notelab.hallucination.backends`) wrap a notelab ``Llama``, a transformers causal LM from a
local folder, or an OpenAI-compatible HTTP endpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from notelab.lm.sampling import FactualNucleus


@dataclass(frozen=True)
class Generation:
    """One sampled continuation: its text, its tokens (as text pieces) and each token's log-probability
    under the model that drew it (natural log; empty when the backend cannot report them)."""

    text: str
    tokens: tuple[str, ...] = ()
    logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Scored:
    """A continuation scored under a prompt: per token, its log-probability and (when the backend sees
    the whole next-token distribution) the entropy of that distribution, in nats."""

    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    entropies: tuple[float, ...] | None = None

    @property
    def total(self) -> float:
        """log p(continuation | prompt): the sum over its tokens."""
        return float(sum(self.logprobs))


@runtime_checkable
class LanguageModel(Protocol):
    """``generate``: ``n`` continuations per prompt (``temperature == 0``: greedy, then ``n`` must be 1
    or all ``n`` are equal); ``top_p`` a float or a :class:`notelab.lm.sampling.FactualNucleus` schedule
    (a backend that cannot apply a schedule raises :class:`notelab.core.errors.ConfigError` saying so);
    ``logprobs``: each continuation scored after its prompt (teacher forcing)."""

    name: str

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float | FactualNucleus = 1.0,
        max_new_tokens: int = 64,
    ) -> list[list[Generation]]: ...

    def logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[Scored]: ...


__all__ = ["Generation", "LanguageModel", "Scored"]
