"""Three :class:`~notelab.hallucination.protocol.LanguageModel` backends: a notelab Llama in process, a
transformers causal LM from a local folder, and an OpenAI-compatible HTTP endpoint.

Scoring a continuation ``c`` after a prompt ``p`` (``logprobs``) is teacher forcing on the text ``p + c``:

    log p(c | p) = sum_{t in C} log p(x_t | x_<t)

where ``x`` is the tokenisation of ``p + c`` (with the model's BOS token first) and ``C`` the tokens whose
text ends after the prompt's last character. Tokenising the joined text, not ``p`` and ``c`` apart, gives the
tokens the model would have read (a BPE merge may span the join: "Paris" after "is" may be one token with
its space); a token that spans the join counts as the continuation's, so every character of ``c`` is
scored (the convention of lm-evaluation-harness, Gao et al. 2021, up to the side a spanning token goes). All
three backends split by that one rule (:func:`continuation_start`), on the same text offsets: the notelab
backend and ``notelab lm serve`` both take them from :func:`notelab.lm.openai_api.token_offsets`, so the
in-process and HTTP backends give the same tokens and log-probabilities.

Sampling: ``temperature == 0`` is greedy (one sequence, repeated ``n`` times); otherwise ``n`` sequences per
prompt, sequence ``j`` of prompt ``i`` from a seed fixed by the backend's ``seed`` (the same call gives the
same samples). A generation's ``logprobs`` are those of its tokens under the model's unprocessed
distribution (temperature 1, no top-p), the quantity token-uncertainty detectors read, and its ``tokens``
are the pieces of its text between the tokens' offsets, so they concatenate to the text (a character
split over several byte-level tokens belongs to the last of them; the others are empty).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import torch

from notelab.core.errors import CheckpointError, ConfigError, DataError, ShapeError
from notelab.data.tokenizer import Tokenizer
from notelab.eval.logprobs import score_sequences, token_logprobs
from notelab.hallucination.protocol import Generation, Scored
from notelab.lm.generate import generate
from notelab.lm.model import Llama
from notelab.lm.openai_api import text_decoder, token_offsets
from notelab.lm.sampling import FactualNucleus


class EndpointError(DataError):
    """An HTTP endpoint that cannot be reached, does not answer in time, or answers outside the API's shape."""


# --- the pieces every backend shares ------------------------------------------------------------------


def check_generate_args(
    who: str,
    prompts: Sequence[str],
    n: int,
    temperature: float,
    top_p: float | FactualNucleus,
    max_new_tokens: int,
    no_schedule: str | None = None,
) -> None:
    """One-line ConfigError naming the first argument of ``generate`` out of range; ``no_schedule``: why this
    backend cannot apply a :class:`FactualNucleus` (``None``: it can)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ConfigError(f"{who}.generate: expected a list of prompt strings, got {type(prompts).__name__}")
    for name, value, lo in (("n", n, 1), ("max_new_tokens", max_new_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ConfigError(f"{who}.generate: expected {name} an integer >= {lo}, got {value!r}")
    if not isinstance(temperature, int | float) or not 0.0 <= temperature <= 2.0:
        raise ConfigError(f"{who}.generate: expected temperature in [0, 2], got {temperature!r}")
    if not isinstance(top_p, FactualNucleus) and (not isinstance(top_p, int | float) or not 0.0 < top_p <= 1.0):
        raise ConfigError(f"{who}.generate: expected top_p in (0, 1] or a FactualNucleus, got {top_p!r}")
    if no_schedule is not None and isinstance(top_p, FactualNucleus):
        raise ConfigError(
            f"{who}.generate: expected top_p a float, got a FactualNucleus schedule ({no_schedule}; use NotelabLM)"
        )


def check_pairs(who: str, prompts: Sequence[str], continuations: Sequence[str]) -> None:
    if isinstance(prompts, str) or isinstance(continuations, str) or len(prompts) != len(continuations):
        raise ConfigError(
            f"{who}.logprobs: expected two lists of strings of one length (prompts, continuations), got "
            f"{type(prompts).__name__} and {type(continuations).__name__}"
        )
    bad = next((i for i, pc in enumerate(zip(prompts, continuations)) if not all(isinstance(s, str) for s in pc)), None)
    if bad is not None:
        raise ConfigError(f"{who}.logprobs: expected strings, got item {bad}: {prompts[bad]!r}, {continuations[bad]!r}")


def continuation_start(offsets: Sequence[int], text_len: int, prompt_len: int) -> int:
    """Index of the first token whose text ends after character ``prompt_len`` (``len(offsets)`` if none).

    ``offsets``: where each token's text starts in a text of ``text_len`` characters; a token ends where the
    next one starts (the last one at ``text_len``).
    """
    ends = [*offsets[1:], text_len]
    return next((i for i, end in enumerate(ends) if end > prompt_len), len(offsets))


def _no_context(who: str, index: int) -> ConfigError:
    return ConfigError(
        f"{who}.logprobs: item {index}: expected a prompt (or a tokenizer with a BOS token) before the "
        "continuation, got a continuation that starts the text (its first token has no context to be scored in)"
    )


def _pieces(text: str, offsets: Sequence[int]) -> tuple[str, ...]:
    """Each token's own text: from its offset to the next token's."""
    ends = [*offsets[1:], len(text)]
    return tuple(text[a:b] for a, b in zip(offsets, ends))


def _copies(n: int, temperature: float) -> int:
    """Sequences to draw per prompt: greedy decoding gives one (repeated), sampling ``n``."""
    return n if temperature > 0 else 1


# --- notelab Llama --------------------------------------------------------------------------------------


class NotelabLM:
    """A notelab :class:`~notelab.lm.model.Llama` and its tokenizer, in process (module docstring).

    Generation runs through :func:`notelab.lm.generate` on its fastest path for the device (``path``);
    log-probabilities and entropies of generated and scored tokens come from one teacher-forced forward
    (:func:`notelab.eval.logprobs.score_sequences`). ``top_p`` may be a
    :class:`notelab.lm.sampling.FactualNucleus`, passed straight to ``generate``.
    """

    def __init__(
        self, model: Llama, tokenizer: Tokenizer, name: str = "notelab", seed: int = 0, path: str = "auto"
    ) -> None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ConfigError(
                f"NotelabLM: expected a tokenizer of at most {model.config.vocab_size} tokens (the model's "
                f"embeddings), got {tokenizer.vocab_size}"
            )
        self.model, self.tokenizer, self.name, self.seed, self.path = model.eval(), tokenizer, name, seed, path
        self._decode = text_decoder(tokenizer)
        self._device = model.embed_tokens.weight.device

    @classmethod
    def from_dir(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", allow_large: bool = False, seed: int = 0
    ) -> NotelabLM:
        """A run directory (model + ``tokenizer.json``, as ``notelab lm train`` writes), named after the folder."""
        from notelab.lm.train import load_run

        model, tokenizer = load_run(path, device=device, allow_large=allow_large)
        return cls(model, tokenizer, name=Path(path).resolve().name, seed=seed)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_bos=self.tokenizer.bos_id is not None)

    def _score(self, rows: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return score_sequences(self.model, rows, self.model.config.vocab_size, self._device)

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float | FactualNucleus = 1.0,
        max_new_tokens: int = 64,
    ) -> list[list[Generation]]:
        check_generate_args("NotelabLM", prompts, n, temperature, top_p, max_new_tokens)
        if not prompts:
            return []
        k = _copies(n, temperature)
        encoded = [self._encode(p) for p in prompts]
        rows = [ids for ids in encoded for _ in range(k)]
        stops = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        new = generate(
            self.model,
            rows,
            max_new_tokens,
            temperature=float(temperature),
            top_p=None if top_p == 1.0 else top_p,
            stop_tokens=stops,
            seed=self.seed,
            path=self.path,
        )
        scored = self._score([row + out for row, out in zip(rows, new)])
        gens = []
        for row, out, (lp, _) in zip(rows, new, scored):
            offsets, text = token_offsets(self._decode, out)
            gens.append(Generation(text, _pieces(text, offsets), tuple(lp[len(row) - 1 :].tolist())))
        return [[gens[i * k + (j if k > 1 else 0)] for j in range(n)] for i in range(len(prompts))]

    def logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[Scored]:
        check_pairs("NotelabLM", prompts, continuations)
        context = self.model.config.max_seq_len
        rows, starts, pieces = [], [], []
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            ids = self._encode(p + c)
            if len(ids) > context:
                raise ShapeError(
                    f"NotelabLM.logprobs: item {i}: expected prompt + continuation within the model's context of "
                    f"{context} tokens, got {len(ids)}"
                )
            offsets, text = token_offsets(self._decode, ids)
            start = continuation_start(offsets, len(text), len(p))
            if start == 0 and ids:
                raise _no_context("NotelabLM", i)
            rows.append(ids)
            starts.append(start)
            pieces.append(_pieces(text, offsets)[start:])
        out = []
        for (lp, ent), start, piece in zip(self._score(rows), starts, pieces):
            out.append(Scored(piece, tuple(lp[start - 1 :].tolist()), tuple(ent[start - 1 :].tolist())))
        return out


# --- transformers -----------------------------------------------------------------------------------------


class TransformersLM:
    """Any transformers causal LM with a fast tokenizer (module docstring); ``from_dir`` loads a local folder.

    Generation through the model's ``generate`` (top-k off, so ``top_p`` alone filters); log-probabilities
    from one teacher-forced forward of ``model(ids).logits``. It cannot apply a
    :class:`~notelab.lm.sampling.FactualNucleus` schedule (a ConfigError says so).
    """

    def __init__(self, model: Any, tokenizer: Any, name: str = "transformers", seed: int = 0) -> None:  # noqa: ANN401
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(
                "TransformersLM: expected a fast tokenizer (its character offsets split prompt from continuation), "
                f"got {type(tokenizer).__name__}"
            )
        self.model, self.tokenizer, self.name, self.seed = model.eval(), tokenizer, name, seed

    @classmethod
    def from_dir(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        seed: int = 0,
    ) -> TransformersLM:
        """``AutoModelForCausalLM`` / ``AutoTokenizer`` from a local folder (never the network)."""
        if not Path(path).is_dir():
            raise DataError(f"TransformersLM.from_dir: expected a model folder, got {str(path)!r} (no such folder)")
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise ConfigError("TransformersLM: expected the transformers package installed, got none") from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            weights = {} if dtype is None else {"dtype": dtype}
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **weights)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"TransformersLM.from_dir: expected a transformers causal LM in {path}: {first}"
            ) from e
        return cls(model.to(device), tokenizer, name=Path(path).resolve().name, seed=seed)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float | FactualNucleus = 1.0,
        max_new_tokens: int = 64,
    ) -> list[list[Generation]]:
        why = "transformers' generate cannot decay top-p within sentences"
        check_generate_args("TransformersLM", prompts, n, temperature, top_p, max_new_tokens, no_schedule=why)
        k = _copies(n, temperature)
        eos = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        sampling = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
        out = []
        for i, prompt in enumerate(prompts):
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(self._device)
            with torch.random.fork_rng(devices=[self._device] if self._device.type == "cuda" else []):
                torch.manual_seed(self.seed + i)
                result = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=k,
                    pad_token_id=pad,
                    return_dict_in_generate=True,
                    output_logits=True,
                    **(sampling if temperature > 0 else dict(do_sample=False)),
                )
            logits = torch.stack(result.logits, dim=1)  # (k, steps, V), unprocessed
            new = result.sequences[:, ids.shape[1] :]
            lp = token_logprobs(logits, new)
            gens = []
            for j in range(k):
                tokens = new[j].tolist()
                end = next((t for t, tok in enumerate(tokens) if tok == eos), len(tokens)) if eos is not None else None
                tokens = tokens[:end]
                offsets, text = token_offsets(self._decode, tokens)
                gens.append(Generation(text, _pieces(text, offsets), tuple(lp[j, : len(tokens)].tolist())))
            out.append([gens[j if k > 1 else 0] for j in range(n)])
        return out

    def logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[Scored]:
        check_pairs("TransformersLM", prompts, continuations)
        rows, starts, pieces = [], [], []
        for i, (p, c) in enumerate(zip(prompts, continuations)):
            text = p + c
            enc = self.tokenizer(text, return_offsets_mapping=True)
            offsets = [start for start, _ in enc["offset_mapping"]]
            # special tokens (BOS) have the span (0, 0): they end before any character
            ends = [end for _, end in enc["offset_mapping"]]
            start = next((t for t, end in enumerate(ends) if end > len(p)), len(ends))
            if start == 0 and ends:
                raise _no_context("TransformersLM", i)
            rows.append(enc["input_ids"])
            starts.append(start)
            pieces.append(tuple(text[a:b] for a, b in zip(offsets[start:], ends[start:])))
        vocab = self.model.config.vocab_size
        scored = score_sequences(self._logits, rows, vocab, self._device)
        return [
            Scored(piece, tuple(lp[s - 1 :].tolist()), tuple(ent[s - 1 :].tolist()))
            for (lp, ent), s, piece in zip(scored, starts, pieces)
        ]


# --- OpenAI-compatible HTTP ---------------------------------------------------------------------------------


def _need(value: object, kind: type | tuple[type, ...], where: str, url: str) -> Any:  # noqa: ANN401
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        shown = json.dumps(value)[:80] if value is not None else "nothing"
        raise EndpointError(f"{url}: expected {where} as {names} in the answer, got {shown}")
    return value


class OpenAICompatLM:
    """An OpenAI-compatible endpoint (``notelab lm serve``, vLLM, llama.cpp's server, ...) over httpx.

    ``generate``: ``/v1/completions`` (``chat=True``: ``/v1/chat/completions``, one user message per prompt);
    ``logprobs``: always ``/v1/completions`` with ``echo``, ``logprobs=0``, ``max_tokens=0`` (the server scores
    the joined text; no generation), split by :func:`continuation_start` on the returned text offsets.
    A server that cannot see the whole distribution gives no entropies (``Scored.entropies`` is None).

    Time bounds: one attempt waits at most ``timeout`` seconds to connect and ``timeout`` for the whole
    answer; an attempt that cannot connect (refused, reset, connect timeout) or gets a 5xx is retried up to
    ``retries`` times after ``backoff * 2^i`` seconds; a slow answer, a 4xx or an answer that is not the API's
    JSON fails at once. So a call raises :class:`EndpointError` (one line) within
    ``(retries + 1) * 2 * timeout + backoff * (2^retries - 1)`` seconds, never hangs.
    ``max_sequences``: most sequences one request asks for (``n`` times its prompts); longer lists are sent in
    several requests.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float = 10.0,
        retries: int = 2,
        chat: bool = False,
        seed: int = 0,
        backoff: float = 0.25,
        max_sequences: int = 16,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"OpenAICompatLM: expected base_url like http://HOST:PORT/v1, got {base_url!r}")
        if not isinstance(timeout, int | float) or timeout <= 0 or backoff < 0:
            raise ConfigError(f"OpenAICompatLM: expected timeout > 0 and backoff >= 0, got {timeout!r}, {backoff!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0 or max_sequences < 1:
            raise ConfigError(
                f"OpenAICompatLM: expected retries >= 0 and max_sequences >= 1, got {retries!r}, {max_sequences!r}"
            )
        self.base_url, self.name, self.chat, self.seed = base_url.rstrip("/"), model, chat, seed
        self.timeout, self.retries, self.backoff, self.max_sequences = float(timeout), retries, backoff, max_sequences
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(self.timeout))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAICompatLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------------------

    def _attempt(self, url: str, body: dict[str, Any]) -> tuple[int, bytes]:
        """One request; its answer read whole within ``timeout`` seconds of sending it."""
        start = time.monotonic()
        with self._client.stream("POST", url, json=body) as resp:
            chunks = []
            for chunk in resp.iter_bytes():
                chunks.append(chunk)
                if time.monotonic() - start > self.timeout:
                    raise httpx.ReadTimeout(f"the answer took more than {self.timeout:g} s")
            return resp.status_code, b"".join(chunks)

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/{path}"
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                status, raw = self._attempt(url, body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as e:
                failure = f"cannot connect ({type(e).__name__}: {e})"
                continue
            except httpx.TimeoutException as e:
                raise EndpointError(f"{url}: no complete answer within the timeout of {self.timeout:g} s ({e})") from e
            except httpx.HTTPError as e:
                raise EndpointError(f"{url}: request failed ({type(e).__name__}: {e})") from e
            if status >= 500:
                failure = f"HTTP {status}: {_error_message(raw)}"
                continue
            if status >= 400:
                raise EndpointError(f"{url}: HTTP {status}: {_error_message(raw)}")
            try:
                answer = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                shown = raw[:80].decode("utf-8", "replace")
                raise EndpointError(f"{url}: expected a JSON answer, got {shown!r}") from None
            return _need(answer, dict, "a JSON object", url)
        raise EndpointError(f"{url}: gave up after {self.retries + 1} attempts: {failure}")

    def _choices(self, answer: dict[str, Any], count: int, url: str) -> list[dict[str, Any]]:
        """The answer's ``count`` choices, ordered by their ``index``."""
        choices = _need(answer.get("choices"), list, '"choices"', url)
        if len(choices) != count:
            raise EndpointError(f'{url}: expected {count} entries in "choices", got {len(choices)}')
        for c in choices:
            _need(c, dict, '"choices" entries', url)
        if all(isinstance(c.get("index"), int) for c in choices):
            choices = sorted(choices, key=lambda c: c["index"])
        return choices

    # -- the protocol ------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float | FactualNucleus = 1.0,
        max_new_tokens: int = 64,
    ) -> list[list[Generation]]:
        why = "the OpenAI API has no per-sentence top-p"
        check_generate_args("OpenAICompatLM", prompts, n, temperature, top_p, max_new_tokens, no_schedule=why)
        k = _copies(n, temperature)
        settings = dict(model=self.name, n=k, max_tokens=max_new_tokens, temperature=float(temperature))
        settings.update(top_p=float(top_p), seed=self.seed)
        gens: list[Generation] = []
        if self.chat:
            url = f"{self.base_url}/chat/completions"
            for p in prompts:
                body = dict(settings, messages=[{"role": "user", "content": p}], logprobs=True)
                gens += [_chat_generation(c, url) for c in self._choices(self._post("chat/completions", body), k, url)]
        else:
            url = f"{self.base_url}/completions"
            step = max(1, self.max_sequences // k)
            for s in range(0, len(prompts), step):
                body = dict(settings, prompt=list(prompts[s : s + step]), logprobs=0)
                choices = self._choices(self._post("completions", body), k * len(prompts[s : s + step]), url)
                gens += [_completion_generation(c, url) for c in choices]
        return [[gens[i * k + (j if k > 1 else 0)] for j in range(n)] for i in range(len(prompts))]

    def logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[Scored]:
        check_pairs("OpenAICompatLM", prompts, continuations)
        url = f"{self.base_url}/completions"
        out = []
        for s in range(0, len(prompts), self.max_sequences):
            texts = [
                p + c for p, c in zip(prompts[s : s + self.max_sequences], continuations[s : s + self.max_sequences])
            ]
            body = dict(model=self.name, prompt=texts, echo=True, logprobs=0, max_tokens=0, temperature=0.0)
            for j, c in enumerate(self._choices(self._post("completions", body), len(texts), url)):
                out.append(_scored(c, len(prompts[s + j]), len(texts[j]), s + j, url))
        return out


def _error_message(raw: bytes) -> str:
    """The OpenAI error body's message, else the start of the answer."""
    try:
        message = json.loads(raw)["error"]["message"]
        if isinstance(message, str):
            return message[:300]
    except (ValueError, KeyError, TypeError):
        pass
    return raw[:120].decode("utf-8", "replace")


def _completion_logprobs(c: dict[str, Any], url: str) -> tuple[list[str], list[float | None], list[int]] | None:
    lp = c.get("logprobs")
    if lp is None:
        return None
    _need(lp, dict, '"logprobs"', url)
    tokens = _need(lp.get("tokens"), list, '"logprobs.tokens"', url)
    values = _need(lp.get("token_logprobs"), list, '"logprobs.token_logprobs"', url)
    offsets = _need(lp.get("text_offset"), list, '"logprobs.text_offset"', url)
    if not len(tokens) == len(values) == len(offsets):
        raise EndpointError(
            f"{url}: expected tokens, token_logprobs and text_offset of one length, got "
            f"{len(tokens)}, {len(values)}, {len(offsets)}"
        )
    if not all(v is None or isinstance(v, int | float) for v in values) or not all(isinstance(o, int) for o in offsets):
        raise EndpointError(f"{url}: expected numbers in token_logprobs and integers in text_offset")
    return [str(t) for t in tokens], values, offsets


def _text_pieces(text: str, tokens: list[str], offsets: list[int]) -> tuple[str, ...]:
    """The tokens as the pieces of ``text`` between their offsets (which concatenate to the text even where
    a token is part of a character), when the offsets fit the text; else the server's token strings."""
    fits = all(0 <= a <= b <= len(text) for a, b in zip(offsets, [*offsets[1:], len(text)]))
    return _pieces(text, offsets) if fits else tuple(tokens)


def _completion_generation(c: dict[str, Any], url: str) -> Generation:
    text = _need(c.get("text"), str, '"text" of a choice', url)
    lp = _completion_logprobs(c, url)
    if lp is None:
        return Generation(text)
    tokens, values, offsets = lp
    return Generation(text, _text_pieces(text, tokens, offsets), tuple(float(v) for v in values if v is not None))


def _chat_generation(c: dict[str, Any], url: str) -> Generation:
    message = _need(c.get("message"), dict, '"message" of a choice', url)
    content = message.get("content")
    text = "" if content is None else _need(content, str, '"message.content"', url)  # null: an empty answer
    lp = c.get("logprobs")
    if lp is None or lp.get("content") is None:
        return Generation(text)
    entries = _need(lp.get("content"), list, '"logprobs.content"', url)
    tokens, values = [], []
    for e in entries:
        _need(e, dict, '"logprobs.content" entries', url)
        tokens.append(str(_need(e.get("token"), str, '"logprobs.content[].token"', url)))
        values.append(float(_need(e.get("logprob"), int | float, '"logprobs.content[].logprob"', url)))
    return Generation(text, tuple(tokens), tuple(values))


def _scored(c: dict[str, Any], prompt_len: int, sent_len: int, index: int, url: str) -> Scored:
    """The continuation's tokens in an echoed choice; a server that generated a token despite max_tokens=0
    has it cut off (only tokens starting within the ``sent_len`` characters sent are kept)."""
    text = _need(c.get("text"), str, '"text" of a choice', url)
    lp = _completion_logprobs(c, url)
    if lp is None:
        raise EndpointError(f"{url}: expected log-probabilities with echo and logprobs=0, got none")
    tokens, values, offsets = lp
    kept = next((i for i, o in enumerate(offsets) if o >= sent_len), len(offsets))
    if kept < len(offsets):
        text = text[: offsets[kept]]
        tokens, values, offsets = tokens[:kept], values[:kept], offsets[:kept]
    start = continuation_start(offsets, len(text), prompt_len)
    if start == 0 and tokens:
        raise _no_context("OpenAICompatLM", index)
    picked = values[start:]
    if any(v is None for v in picked):
        raise EndpointError(f"{url}: expected a log-probability for every continuation token, got null")
    return Scored(_text_pieces(text, tokens, offsets)[start:], tuple(float(v) for v in picked), None)


__all__ = [
    "EndpointError",
    "NotelabLM",
    "OpenAICompatLM",
    "TransformersLM",
    "check_generate_args",
    "check_pairs",
    "continuation_start",
]
