"""The Llama 3 chat template (Llama 3 model card, "Prompt format"; Dubey et al. 2024, sec. 4.1).

A conversation is rendered as::

    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>     (once per message)
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                     (add_generation_prompt)

with each message's content stripped of surrounding whitespace, as the reference template does.
The model ends its turn with ``<|eot_id|>``, so that token is the stop token of a chat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from notelab.core.errors import DataError
from notelab.data.tokenizer import Tokenizer

BEGIN_OF_TEXT = "<|begin_of_text|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
ROLES = ("system", "user", "assistant", "ipython", "tool")


def format_message(role: str, content: str) -> str:
    """One turn: header, blank line, stripped content, end of turn."""
    return f"{START_HEADER}{role}{END_HEADER}\n\n{content.strip()}{EOT}"


def apply_chat_template(
    messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False, add_bos: bool = True
) -> str:
    """The Llama 3 rendering of ``[{"role": ..., "content": ...}, ...]`` (module docstring)."""
    parts = [BEGIN_OF_TEXT] if add_bos else []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise DataError(f"messages[{i}]: expected a role in {', '.join(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise DataError(f"messages[{i}]: expected string content, got {type(m['content']).__name__}")
        parts.append(format_message(m["role"], m["content"]))
    if add_generation_prompt:
        parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
    return "".join(parts)


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of the rendered conversation; the tokenizer must hold the Llama 3 special tokens."""
    missing = [t for t in (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT) if tokenizer.token_to_id(t) is None]
    if missing:
        raise DataError(f"chat template: expected the tokenizer to hold {', '.join(missing)}, it does not")
    return tokenizer.encode(apply_chat_template(messages, add_generation_prompt))


def chat_stop_tokens(tokenizer: Tokenizer) -> list[int]:
    """Ids that end an assistant turn: ``<|eot_id|>`` and ``<|end_of_text|>`` when present."""
    ids = [tokenizer.token_to_id(EOT), tokenizer.eos_id]
    return [i for i in ids if i is not None]
