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
    """One turn: header, blank line, stripped content, end of turn (as text, for display)."""
    return "".join(piece for _, piece in _message_parts(role, content))


def _message_parts(role: str, content: str) -> list[tuple[bool, str]]:
    # (is a control token, text) pieces of one turn; the content is never a control token.
    return [(True, START_HEADER), (False, role), (True, END_HEADER), (False, f"\n\n{content.strip()}"), (True, EOT)]


def _template_parts(
    messages: Sequence[Mapping[str, str]], add_generation_prompt: bool, add_bos: bool
) -> list[tuple[bool, str]]:
    """The rendering of the module docstring as (is a control token, text) pieces."""
    parts = [(True, BEGIN_OF_TEXT)] if add_bos else []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise DataError(f"messages[{i}]: expected a role in {', '.join(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise DataError(f"messages[{i}]: expected string content, got {type(m['content']).__name__}")
        parts += _message_parts(m["role"], m["content"])
    if add_generation_prompt:
        parts += [(True, START_HEADER), (False, "assistant"), (True, END_HEADER), (False, "\n\n")]
    return parts


def apply_chat_template(
    messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False, add_bos: bool = True
) -> str:
    """The Llama 3 rendering of ``[{"role": ..., "content": ...}, ...]`` as text (module docstring).

    For display: encoding this string reads the control tokens as plain text; use ``encode_chat``.
    """
    return "".join(piece for _, piece in _template_parts(messages, add_generation_prompt, add_bos))


def encode_chat(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of the rendered conversation; the tokenizer must hold the Llama 3 special tokens.

    The control ids are inserted by code around the encoded roles and contents, so a message
    whose content spells ``<|eot_id|>`` (or any control token) cannot end its turn or open another.
    """
    missing = [t for t in (BEGIN_OF_TEXT, START_HEADER, END_HEADER, EOT) if tokenizer.token_to_id(t) is None]
    if missing:
        raise DataError(f"chat template: expected the tokenizer to hold {', '.join(missing)}, it does not")
    parts = _template_parts(messages, add_generation_prompt, add_bos=True)
    texts = iter(tokenizer.encode_batch([piece for control, piece in parts if not control]))
    ids: list[int] = []
    for control, piece in parts:
        ids += [tokenizer.special_id(piece)] if control else next(texts)
    return ids


def chat_stop_tokens(tokenizer: Tokenizer) -> list[int]:
    """Ids that end an assistant turn: ``<|eot_id|>`` and ``<|end_of_text|>`` when present."""
    ids = [tokenizer.token_to_id(EOT), tokenizer.eos_id]
    return [i for i in ids if i is not None]
