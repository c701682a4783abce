"""The OpenAI HTTP API spoken by ``notelab lm serve``: request checks, response shapes, text streams.

Requests follow the OpenAI reference (https://platform.openai.com/docs/api-reference, the
``/v1/completions`` and ``/v1/chat/completions`` bodies), so the official ``openai`` client and
the tools built on it work unchanged. Every field is checked here, before anything reaches the
engine: a bad field becomes :class:`APIError` (HTTP 400) with the OpenAI error body::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Supported: ``prompt`` as a string (the model's raw input: ``<|begin_of_text|>`` is put first, and
spelled special tokens such as ``<|eot_id|>`` are read as those tokens, as vLLM does), a list of
token ids (taken as they are), or a list of either (one block of ``n`` choices per prompt);
``messages`` rendered with the Llama 3 chat template (:func:`notelab.lm.chat.encode_chat`);
``max_tokens`` (``max_completion_tokens`` for chat), ``temperature``, ``top_p``, ``n``, ``stop``
(strings, matched on the decoded text), ``seed`` (choice i of a request draws from seed + i),
``stream`` with ``stream_options.include_usage``, ``echo``, and ``logprobs`` of the chosen tokens
(completions: ``logprobs=0``; chat: ``logprobs=true, top_logprobs=0``: the engine scores the token
it picks, not alternatives). Completions with ``echo`` and ``logprobs=0`` also score the prompt's
tokens (the first one null, as it has no context), and ``max_tokens=0`` with ``echo`` scores without
generating: the legacy API's way to get ``log p(continuation | prompt)`` for a given text.
Extensions, as vLLM spells them: ``top_k``, ``repetition_penalty``, ``stop_token_ids``.
Fields the server cannot honour (penalties, ``logit_bias``, ``suffix``, tools, top alternatives)
are refused with a 400 rather than ignored; unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from notelab.core.errors import NotelabError
from notelab.data.tokenizer import Tokenizer
from notelab.lm.chat import ROLES, chat_stop_tokens, encode_chat
from notelab.lm.engine import SamplingParams

INVALID = "invalid_request_error"


class APIError(Exception):
    """A request the server refuses; ``body()`` is the OpenAI error object."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None, kind: str = INVALID
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServeConfig:
    """What the server serves and the bounds it enforces on a request."""

    model_name: str  # the one id listed by /v1/models and accepted in ``model``
    context_len: int  # longest prompt + completion, in tokens
    vocab_size: int  # token ids must lie in [0, vocab_size) (the model's embeddings)
    max_n: int = 16  # most sequences one request may ask for (n times the number of prompts)
    max_stop: int = 16  # most stop strings
    default_max_tokens: int = 16  # completions without max_tokens (OpenAI's default); chat: the room left
    api_key: str | None = None  # if set, /v1/ requests must carry "Authorization: Bearer <api_key>"


@dataclass
class GenerationRequest:
    """A checked request: one entry of ``choices`` (a prompt and its sampling) per sequence to generate."""

    chat: bool
    prompts: list[list[int]]  # one per prompt; choice i uses prompts[i // n]
    n: int
    choices: list[SamplingParams]
    stop: tuple[str, ...]  # stop strings, matched on the decoded completion
    stream: bool
    include_usage: bool
    logprobs: bool
    echo: bool
    prompt_logprobs: bool = False  # echo with logprobs: the prompt's tokens are scored too
    generate: bool = True  # False for max_tokens=0 with echo: the prompt is only echoed (and scored)


# --- field readers: each names the field and says what was expected and what was given -------------


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(body: Mapping, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise APIError(f"{name}: expected an integer, got {_type_name(value)} {value!r}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"at least {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise APIError(f"{name}: expected an integer {bounds}, got {value}", name)
    return value


def _number(body: Mapping, name: str, default: float, ok: Callable[[float], bool], expected: str) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value):
        raise APIError(f"{name}: expected a number, got {_type_name(value)} {value!r}", name)
    if not ok(float(value)):
        raise APIError(f"{name}: expected a number {expected}, got {value}", name)
    return float(value)


def _bool(body: Mapping, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"{name}: expected true or false, got {_type_name(value)} {value!r}", name)
    return value


def _absent_or(body: Mapping, name: str, allowed: Callable[[Any], bool], why: str) -> None:
    """Refuse a field the server cannot honour, unless it has its no-op value."""
    value = body.get(name)
    if value is not None and not allowed(value):
        raise APIError(f"{name}: {why}, got {value!r}", name)


def _token_ids(value: object, name: str, vocab_size: int) -> list[int] | None:
    """``value`` as a list of token ids, or None when it is not a list of integers."""
    if not isinstance(value, list) or not value or not all(_is_int(t) for t in value):
        return None
    bad = [t for t in value if not 0 <= t < vocab_size]
    if bad:
        raise APIError(f"{name}: expected token ids in [0, {vocab_size}), got {bad[:5]}", name)
    return value


class OpenAIAPI:
    """Checks request bodies against one model and tokenizer and shapes the responses."""

    def __init__(self, tokenizer: Tokenizer, config: ServeConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.decode = text_decoder(tokenizer)
        self._token_text = text_decoder(tokenizer, skip_special_tokens=False)

    # --- requests ---------------------------------------------------------------------------

    def completion_request(self, body: object) -> GenerationRequest:
        body = self._object(body)
        raw = body.get("prompt")
        ids = _token_ids(raw, "prompt", self.config.vocab_size)
        if ids is not None:
            prompts = [ids]
        elif isinstance(raw, str):
            prompts = [self._encode_text(raw)]
        elif isinstance(raw, list) and raw:
            prompts = []
            for i, p in enumerate(raw):
                name = f"prompt[{i}]"
                if isinstance(p, str):
                    prompts.append(self._encode_text(p, name))
                elif (one := _token_ids(p, name, self.config.vocab_size)) is not None:
                    prompts.append(one)
                else:
                    raise APIError(f"{name}: expected a string or a non-empty list of token ids, got {p!r}", "prompt")
        else:
            raise APIError(
                "prompt: expected a string, a non-empty list of token ids, or a list of those, "
                f"got {_type_name(raw)} {raw!r}"[:300],
                "prompt",
            )
        lp = _int(body, "logprobs", None, lo=0)
        if lp:
            raise APIError(
                f"logprobs: expected 0 (the chosen tokens' log-probabilities; alternatives are not computed), got {lp}",
                "logprobs",
            )
        _absent_or(body, "suffix", lambda v: v == "", "expected no suffix (insertion is not supported)")
        echo = _bool(body, "echo")
        default_stops = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        score_only = echo and body.get("max_tokens") == 0
        if score_only and _bool(body, "stream"):
            raise APIError("stream: expected false with max_tokens=0 (nothing is generated to stream)", "stream")
        req = self._common(
            body,
            prompts,
            default_stops,
            "max_tokens",
            self.config.default_max_tokens,
            lp is not None,
            echo,
            max_tokens=1 if score_only else None,
        )
        req.prompt_logprobs = echo and lp is not None
        req.generate = not score_only
        return req

    def chat_request(self, body: object) -> GenerationRequest:
        body = self._object(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(
                f"messages: expected a non-empty list of {{role, content}}, got {_type_name(messages)}", "messages"
            )
        plain = [self._message(m, i) for i, m in enumerate(messages)]
        try:
            prompt = encode_chat(self.tokenizer, plain)
        except NotelabError as e:
            raise APIError(f"messages: {e}", "messages") from e
        for name in ("tools", "functions"):
            _absent_or(body, name, lambda v: v == [], "expected no tools (tool calls are not supported)")
        _absent_or(
            body,
            "response_format",
            lambda v: isinstance(v, dict) and v.get("type") == "text",
            'expected {"type": "text"} (structured output is not supported)',
        )
        logprobs = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", 0, lo=0)
        if top:
            raise APIError(
                f"top_logprobs: expected 0 (alternatives to the chosen token are not computed), got {top}",
                "top_logprobs",
            )
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        return self._common(body, [prompt], chat_stop_tokens(self.tokenizer), name, None, logprobs, False, chat=True)

    def _object(self, body: object) -> Mapping:
        if not isinstance(body, dict):
            raise APIError(f"expected a JSON object as the request body, got {_type_name(body)}")
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(f"model: expected the string {self.config.model_name!r}, got {_type_name(model)}", "model")
        if model != self.config.model_name:
            raise APIError(
                f"model: expected {self.config.model_name!r} (the one model served), got {model!r}",
                "model",
                code="model_not_found",
            )
        return body

    def _encode_text(self, text: str, name: str = "prompt") -> list[int]:
        # A completions prompt is the model's raw input, so spelled special tokens (a pre-rendered chat
        # template) are read as such, as vLLM does; chat content never is (encode_chat).
        ids = self.tokenizer.encode(text, add_bos=self.tokenizer.bos_id is not None, allow_special=True)
        if not ids:
            raise APIError(f"{name}: expected text of at least one token, got {text!r}", "prompt")
        return ids

    @staticmethod
    def _message(m: object, i: int) -> dict[str, str]:
        name = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(f"{name}: expected an object with a string 'role', got {m!r}"[:300], "messages")
        if m["role"] not in (*ROLES, "developer"):
            raise APIError(f"{name}.role: expected one of {', '.join(ROLES)}, got {m['role']!r}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts have a rendering in the template
            parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
            if any(not isinstance(p, str) for p in parts):
                raise APIError(f"{name}.content: expected text parts only, got {content!r}"[:300], "messages")
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(f"{name}.content: expected a string, got {_type_name(content)}", "messages")
        # OpenAI's "developer" role is the system prompt of newer models; Llama 3 calls it "system".
        return {"role": "system" if m["role"] == "developer" else m["role"], "content": content}

    def _common(
        self,
        body: Mapping,
        prompts: list[list[int]],
        stop_ids: list[int],
        max_name: str,
        default_max: int | None,
        logprobs: bool,
        echo: bool,
        chat: bool = False,
        max_tokens: int | None = None,
    ) -> GenerationRequest:
        """The fields every request shares; ``max_tokens`` given replaces the body's (max_tokens=0 with echo,
        checked by the caller, builds choices that are never run)."""
        cfg = self.config
        n = _int(body, "n", 1, lo=1)
        if n * len(prompts) > cfg.max_n:
            what = f"n={n}" if len(prompts) == 1 else f"n={n} times {len(prompts)} prompts"
            raise APIError(f"n: expected at most {cfg.max_n} sequences per request, got {what}", "n")
        _absent_or(body, "best_of", lambda v: v == n, f"expected best_of equal to n={n} (ranking is not supported)")
        for name in ("frequency_penalty", "presence_penalty"):
            _absent_or(body, name, lambda v: v == 0, "expected 0 (use repetition_penalty)")
        _absent_or(body, "logit_bias", lambda v: v == {}, "expected no logit_bias (not supported)")
        temperature = _number(body, "temperature", 1.0, lambda t: 0.0 <= t <= 2.0, "in [0, 2]")
        top_p = _number(body, "top_p", 1.0, lambda p: 0.0 < p <= 1.0, "in (0, 1]")
        top_k = _int(body, "top_k", None, lo=-1)
        if top_k == 0:
            raise APIError("top_k: expected a positive integer, or -1 for no limit, got 0", "top_k")
        penalty = _number(body, "repetition_penalty", 1.0, lambda r: r > 0.0, "> 0")
        seed = _int(body, "seed", None)
        stop = body.get("stop")
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (
            not isinstance(stops, list) or len(stops) > cfg.max_stop or not all(isinstance(s, str) and s for s in stops)
        ):
            raise APIError(
                f"stop: expected a non-empty string or a list of at most {cfg.max_stop} of them, got {stop!r}"[:300],
                "stop",
            )
        extra_ids = body.get("stop_token_ids")
        if extra_ids is not None and extra_ids != []:
            if _token_ids(extra_ids, "stop_token_ids", cfg.vocab_size) is None:
                raise APIError(
                    f"stop_token_ids: expected a list of token ids, got {extra_ids!r}"[:300], "stop_token_ids"
                )
            stop_ids = [*stop_ids, *extra_ids]
        stream = _bool(body, "stream")
        options = body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict)):
            raise APIError(
                f"stream_options: expected an object, and only with stream=true, got {options!r}", "stream_options"
            )
        include_usage = _bool(options or {}, "include_usage")
        if max_tokens is None:
            max_tokens = _int(body, max_name, None, lo=1)
        longest = max(len(p) for p in prompts)
        room = cfg.context_len - longest
        where = "messages" if chat else "prompt"
        if room < 1:
            raise APIError(
                f"{where}: expected at most {cfg.context_len - 1} tokens (the context is {cfg.context_len}, "
                f"and one new token needs room), got {longest}",
                where,
                code="context_length_exceeded",
            )
        if max_tokens is not None and max_tokens > room:
            raise APIError(
                f"{max_name}: expected prompt + {max_name} <= the context of {cfg.context_len} tokens, "
                f"got {longest} + {max_tokens} = {longest + max_tokens}",
                max_name,
                code="context_length_exceeded",
            )
        choices = []
        for i in range(len(prompts) * n):
            room_i = cfg.context_len - len(prompts[i // n])
            choices.append(
                SamplingParams(
                    max_new_tokens=min(room_i, max_tokens or default_max or room_i),
                    temperature=temperature,
                    top_k=top_k if top_k not in (None, -1) else None,
                    top_p=top_p if top_p < 1.0 else None,
                    repetition_penalty=penalty,
                    stop_tokens=tuple(dict.fromkeys(stop_ids)),
                    # the choices of one request differ: the i-th draws from seed + i
                    seed=None if seed is None else seed + i,
                    logprobs=logprobs,
                )
            )
        return GenerationRequest(
            chat=chat,
            prompts=prompts,
            n=n,
            choices=choices,
            stop=tuple(stops or ()),
            stream=stream,
            include_usage=include_usage,
            logprobs=logprobs,
            echo=echo,
        )

    # --- responses --------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        model = {"id": self.config.model_name, "object": "model", "created": 0, "owned_by": "notelab"}
        return {"object": "list", "data": [model]}

    def token_text(self, token: int) -> str:
        """One token's own text, special tokens spelled out (for log-probability entries)."""
        return self._token_text([token])


def text_decoder(tokenizer: Tokenizer, skip_special_tokens: bool = True) -> Callable[[Sequence[int]], str]:
    """Token ids -> text, ids past the tokenizer's vocabulary dropped: a model may have more
    embeddings than its tokenizer has tokens, and those ids have no text."""
    size = tokenizer.vocab_size

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode([i for i in ids if i < size], skip_special_tokens=skip_special_tokens)

    return decode


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def token_offsets(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> tuple[list[int], str]:
    """Where each token's text starts in ``decode(ids)``, and that text, as a :class:`TextStream` sees them: the
    offsets the server reports for generated tokens, so a client splits echoed text the same way (the tokens
    of one character all start where it starts)."""
    stream = TextStream(decode)
    offsets = []
    for t in ids:
        offsets.append(len(stream.text))
        stream.push(t)
    stream.flush()
    return offsets, stream.text


class TextStream:
    """Token ids -> text deltas of one completion, with stop strings cut out.

    Decoding token by token is wrong for byte-level BPE: a character may span tokens, so the
    text of a token depends on its neighbours. The stream decodes a short window instead
    (``ids[prefix:]`` against ``ids[prefix:read]``, the scheme of Hugging Face's
    text-generation-inference) and holds back text that ends in an incomplete character
    (U+FFFD), so the concatenated deltas equal ``decode(all ids)``. Text that could be the start
    of a stop string is held back too, until it is known not to be; once a stop string appears,
    the text before it is released and the stream is ``stopped``.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids[:read] are decoded into ``text``
        self.text = ""  # decoded so far (beyond what the stop check has released)
        self.sent = 0  # text[:sent] has been returned
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; the text that may be sent now ('' while a character or stop string is pending)."""
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix : self.read])
        window = self.decode(self.ids[self.prefix :])
        if len(window) > len(before) and not window.endswith("\ufffd"):
            self.text += window[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The end of the completion: whatever is still held back (an incomplete character stays U+FFFD)."""
        if self.stopped:
            return ""
        before = self.decode(self.ids[self.prefix : self.read])
        self.text += self.decode(self.ids[self.prefix :])[len(before) :]
        self.prefix = self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        if self.stop:
            # A stop string that ends in the new text starts at most len(stop) - 1 characters before it.
            start = max(0, self.sent - max(map(len, self.stop)) + 1)
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                end, self.stopped = min(hits), True
            elif not final:
                end -= max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        out = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out
