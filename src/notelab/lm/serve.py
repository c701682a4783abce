"""``notelab lm serve``: an OpenAI-compatible HTTP server for notelab Llama checkpoints.

    notelab lm serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--model-name NAME] [--max-batch 64]
                     [--api-key KEY]

    GET  /v1/models              the checkpoint, as one model id (the folder name unless --model-name)
    GET  /v1/models/{id}         that model, or 404
    POST /v1/completions         prompt (text or token ids) -> text; stream, logprobs, echo, n, stop, seed;
                                 echo + logprobs=0 scores the prompt too (max_tokens=0: scoring only)
    POST /v1/chat/completions    messages, rendered with the Llama 3 chat template -> the assistant turn
    GET  /health                 200 while the scheduler runs

Any OpenAI client works: ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")``.
Streaming answers are server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.
With ``--api-key KEY``, /v1/ requests must carry ``Authorization: Bearer KEY`` (401 otherwise).
Bad requests get HTTP 400 with OpenAI's error body (:mod:`notelab.lm.openai_api`), unknown routes
404 in the same shape; neither disturbs the requests in flight.

Continuous batching (iteration-level scheduling, Yu et al. 2022, "Orca", OSDI): one scheduler
thread owns the :class:`notelab.lm.engine.Engine` and loops: apply the adds and cancels that HTTP
handlers queued, run one ``engine.step()`` (which admits waiting requests and decodes one token
for every running one), and hand the step's events to their requests, so a request joins or
leaves the running batch between two steps. The thread never waits for a client: each HTTP
request owns an unbounded asyncio queue, filled by one ``call_soon_threadsafe`` per step, and a
slow reader only slows its own response. A client that disconnects is noticed by a watcher on
its ASGI ``receive`` channel, which cancels its sequences in the engine and frees their slots.
Scoring a prompt (echo with logprobs) is one teacher-forced forward run by the same thread between
two steps (:func:`notelab.eval.logprobs.score_sequences`), so it never races the engine for the model.

Built on Starlette (routing, streaming responses) and uvicorn (the HTTP server).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from notelab.core.errors import NotelabError
from notelab.data.tokenizer import Tokenizer
from notelab.eval.logprobs import score_sequences
from notelab.lm.engine import Engine, SamplingParams, TokenEvent
from notelab.lm.openai_api import (
    APIError,
    GenerationRequest,
    OpenAIAPI,
    ServeConfig,
    TextStream,
    new_id,
    now,
    token_offsets,
    usage,
)

log = logging.getLogger(__name__)


@dataclass
class Failure:
    """The engine refused a request (or failed while running it)."""

    error: BaseException


ACCEPTED = "accepted"  # the engine took every sequence of the request
DISCONNECTED = "disconnected"  # the client went away
_STOP = object()


@dataclass
class _Add:
    items: Sequence[tuple[Sequence[int], SamplingParams]]
    out: asyncio.Queue


@dataclass
class _Score:
    rows: Sequence[Sequence[int]]
    out: asyncio.Queue


@dataclass
class _Cancel:
    out: asyncio.Queue
    index: int | None = None  # None: every sequence of the request


class Scheduler:
    """The thread that drives the engine (module docstring); thread-safe ``submit`` and ``cancel``.

    A request's queue receives ``ACCEPTED`` or a :class:`Failure` first, then
    ``(index, TokenEvent)`` pairs, ``index`` being the sequence's position in ``submit``'s items.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._owner: dict[int, tuple[asyncio.Queue, int]] = {}  # engine request id -> (queue, index)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.steps = 0

    @property
    def active(self) -> int:
        """Sequences added and neither finished nor cancelled."""
        return len(self._owner)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="notelab-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._inbox.put(_STOP)
            self._thread.join()
            self._thread = None

    def submit(self, items: Sequence[tuple[Sequence[int], SamplingParams]], out: asyncio.Queue) -> None:
        self._inbox.put(_Add(items, out))

    def cancel(self, out: asyncio.Queue, index: int | None = None) -> None:
        self._inbox.put(_Cancel(out, index))

    def score(self, rows: Sequence[Sequence[int]], out: asyncio.Queue) -> None:
        """Put on ``out`` the ``(log-probs, entropies)`` of each row's tokens after its first (or a Failure)."""
        self._inbox.put(_Score(rows, out))

    def _run(self) -> None:
        # Decoding needs no autograd; no_grad is thread-local, so it is set on this thread.
        with torch.no_grad():
            while True:
                outbox: list[tuple[asyncio.Queue, Any]] = []
                try:
                    # Idle: sleep until a command comes. Busy: take what has come, then step.
                    cmd = self._inbox.get() if not self.engine.has_work() else self._next()
                    while cmd is not None:
                        if cmd is _STOP:
                            return
                        self._apply(cmd, outbox)
                        cmd = self._next()
                    if self.engine.has_work():
                        self._step(outbox)
                except Exception as e:  # the thread must not die: every waiting handler would hang
                    self._fail_all(e, outbox)
                if outbox:
                    self._loop.call_soon_threadsafe(_deliver, outbox)

    def _next(self) -> object | None:
        try:
            return self._inbox.get_nowait()
        except queue.Empty:
            return None

    def _apply(self, cmd: _Add | _Cancel | _Score, outbox: list) -> None:
        if isinstance(cmd, _Score):
            model = self.engine.model
            try:
                outbox.append((cmd.out, score_sequences(model, cmd.rows, self.engine.vocab, self.engine.device)))
            except Exception as e:  # this request fails; the thread and the others go on
                outbox.append((cmd.out, Failure(e)))
            return
        if isinstance(cmd, _Cancel):
            for rid, (out, index) in list(self._owner.items()):
                if out is cmd.out and cmd.index in (None, index):
                    self.engine.cancel(rid)
                    del self._owner[rid]
            return
        added: list[int] = []
        try:
            for prompt, params in cmd.items:
                added.append(self.engine.add(prompt, params))
        except Exception as e:  # all or nothing: a request whose n-th sequence is refused gets none
            for rid in added:
                self.engine.cancel(rid)
            outbox.append((cmd.out, Failure(e)))
            return
        for index, rid in enumerate(added):
            self._owner[rid] = (cmd.out, index)
        outbox.append((cmd.out, ACCEPTED))

    def _step(self, outbox: list) -> None:
        self.steps += 1
        events: list[TokenEvent] = self.engine.step()
        for event in events:
            owner = self._owner.get(event.request_id)
            if owner is None:  # cancelled by its client this step
                continue
            outbox.append((owner[0], (owner[1], event)))
            if event.finished:
                del self._owner[event.request_id]

    def _fail_all(self, error: Exception, outbox: list) -> None:
        log.exception("the engine failed; failing the %d running sequences", len(self._owner))
        for out in {id(out): out for out, _ in self._owner.values()}.values():
            outbox.append((out, Failure(error)))
        for rid in self._owner:
            try:
                self.engine.cancel(rid)
            except Exception:  # the engine is already broken; the failure above is what counts
                log.exception("engine.cancel(%d) failed", rid)
        self._owner.clear()


def _deliver(outbox: list[tuple[asyncio.Queue, Any]]) -> None:
    for out, item in outbox:
        out.put_nowait(item)


async def _watch_disconnect(request: Request, out: asyncio.Queue) -> None:
    """Put DISCONNECTED on ``out`` when the client closes the connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    out.put_nowait(DISCONNECTED)


@dataclass
class _Choice:
    """One sequence's state while its events arrive."""

    text: TextStream
    stop_ids: frozenset[int]
    tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[tuple[int, float, int]] = field(default_factory=list)  # (token, logprob, text offset)


@dataclass
class _Delta:
    index: int
    text: str
    logprobs: list[tuple[int, float, int]]
    finish_reason: str | None


class _Session:
    """One HTTP request's sequences in the scheduler: submit, turn events into text deltas, cancel."""

    def __init__(self, scheduler: Scheduler, api: OpenAIAPI, req: GenerationRequest, request: Request) -> None:
        self.scheduler, self.api, self.req, self.request = scheduler, api, req, request
        self.out: asyncio.Queue = asyncio.Queue()
        self.choices = [_Choice(TextStream(api.decode, req.stop), frozenset(p.stop_tokens)) for p in req.choices]
        self.watcher: asyncio.Task | None = None
        self.disconnected = False

    async def start(self) -> bool:
        """Submit every sequence; False if the client has gone, APIError (400) if the engine refuses."""
        items = [(self.req.prompts[i // self.req.n], p) for i, p in enumerate(self.req.choices)]
        self.scheduler.submit(items, self.out)
        self.watcher = asyncio.ensure_future(_watch_disconnect(self.request, self.out))
        try:
            first = await self.out.get()
        except BaseException:
            self.close()
            raise
        if first is DISCONNECTED:
            self.disconnected = True
            self.close()
            return False
        if isinstance(first, Failure):
            self.close(cancel=False)
            if isinstance(first.error, NotelabError):
                raise APIError(str(first.error)) from first.error
            raise first.error
        return True

    def close(self, cancel: bool = True) -> None:
        """Free the engine's slots of every unfinished sequence (no-op when all finished)."""
        if self.watcher is not None:
            self.watcher.cancel()
        if cancel and any(c.finish_reason is None for c in self.choices):
            self.scheduler.cancel(self.out)

    async def batches(self) -> AsyncIterator[list[_Delta]]:
        """Text deltas until every sequence has finished, as many per batch as have arrived (one write
        each when streaming: a reader that fell behind catches up in one go); ends early if the client
        disconnects."""
        left = len(self.choices)
        while left:
            items = [await self.out.get()]
            while not self.out.empty():
                items.append(self.out.get_nowait())
            batch = []
            for item in items:
                if item is DISCONNECTED:
                    self.disconnected = True
                    break
                if isinstance(item, Failure):
                    raise item.error
                delta = self._delta(*item)
                if delta is not None:
                    left -= delta.finish_reason is not None
                    batch.append(delta)
            if batch:
                yield batch
            if self.disconnected:
                return

    def _delta(self, index: int, event: TokenEvent) -> _Delta | None:
        c = self.choices[index]
        if c.finish_reason is not None:  # ended by a stop string; events already in flight
            return None
        delta = _Delta(index, "", [], None)
        # A stop token ends the sequence and is not part of the completion (as in lm.generate).
        if event.token is not None and not (event.finished and event.token in c.stop_ids):
            offset = len(c.text.text)
            delta.text = c.text.push(event.token)
            c.tokens += 1
            if self.req.logprobs and event.logprob is not None:
                delta.logprobs.append((event.token, float(event.logprob), offset))
        if c.text.stopped:
            c.finish_reason = "stop"
            if not event.finished:
                self.scheduler.cancel(self.out, index)
        elif event.finished:
            delta.text += c.text.flush()
            c.finish_reason = event.finish_reason or "stop"
        delta.finish_reason = c.finish_reason
        c.logprobs.extend(delta.logprobs)
        return delta if delta.text or delta.logprobs or delta.finish_reason else None

    def usage(self) -> dict[str, int]:
        return usage(sum(map(len, self.req.prompts)), sum(c.tokens for c in self.choices))


def _sse(data: object) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class Server:
    """The HTTP handlers over one scheduler and one request checker."""

    def __init__(self, scheduler: Scheduler, api: OpenAIAPI) -> None:
        self.scheduler, self.api = scheduler, api

    async def models(self, request: Request) -> Response:
        return JSONResponse(self.api.models())

    async def model(self, request: Request) -> Response:
        (served,) = self.api.models()["data"]
        if request.path_params["model"] != served["id"]:
            message = f"model: expected {served['id']!r} (the one model served), got {request.path_params['model']!r}"
            raise APIError(message, "model", status=404, code="model_not_found")
        return JSONResponse(served)

    async def health(self, request: Request) -> Response:
        ok = self.scheduler.running
        return JSONResponse({"status": "ok" if ok else "stopped", "active": self.scheduler.active}, 200 if ok else 503)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, self.api.completion_request(await _json(request)))

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, self.api.chat_request(await _json(request)))

    async def _prompt_logprobs(self, req: GenerationRequest) -> list[list[tuple[int, float | None, int]]]:
        """Per prompt, its tokens' (id, log-probability, text offset); the first has no context, so None."""
        out: asyncio.Queue = asyncio.Queue()
        self.scheduler.score(req.prompts, out)
        scored = await out.get()
        if isinstance(scored, Failure):
            if isinstance(scored.error, NotelabError):
                raise APIError(str(scored.error)) from scored.error
            raise scored.error
        entries = []
        for ids, (lp, _) in zip(req.prompts, scored):
            offsets, _ = token_offsets(self.api.decode, ids)
            lps = [None, *lp.tolist()]
            entries.append([(t, lps[i], offsets[i]) for i, t in enumerate(ids)])
        return entries

    def _echo_only(self, req: GenerationRequest, prompt_lp: list | None) -> dict[str, Any]:
        """max_tokens=0 with echo: each prompt's text (and its tokens' log-probabilities), nothing generated."""
        choices = []
        for i in range(len(req.choices)):
            lp = self._logprobs(prompt_lp[i // req.n]) if prompt_lp is not None else None
            text = self.api.decode(req.prompts[i // req.n])
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": "length"})
        meta = {"id": new_id("cmpl"), "created": now(), "model": self.api.config.model_name}
        used = usage(sum(map(len, req.prompts)), 0)
        return {**meta, "object": "text_completion", "choices": choices, "usage": used}

    async def _generate(self, request: Request, req: GenerationRequest) -> Response:
        prompt_lp = await self._prompt_logprobs(req) if req.prompt_logprobs else None
        if not req.generate:
            return JSONResponse(self._echo_only(req, prompt_lp))
        session = _Session(self.scheduler, self.api, req, request)
        if not await session.start():
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        meta = {
            "id": new_id("chatcmpl" if req.chat else "cmpl"),
            "created": now(),
            "model": self.api.config.model_name,
        }
        if req.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            # The background close also covers a stream cancelled before its generator began (whose
            # finally never runs); closing twice is harmless.
            return StreamingResponse(
                self._stream(session, meta, prompt_lp),
                media_type="text/event-stream",
                headers=headers,
                background=BackgroundTask(session.close),
            )
        try:
            body = await self._collect(session, meta, prompt_lp)
        finally:
            session.close()
        return JSONResponse(body) if body is not None else Response(status_code=499)  # nobody reads it

    async def _collect(
        self, session: _Session, meta: dict[str, Any], prompt_lp: list | None = None
    ) -> dict[str, Any] | None:
        req = session.req
        texts = ["" for _ in session.choices]
        if req.echo:
            texts = [self.api.decode(req.prompts[i // req.n]) for i in range(len(texts))]
        echoed = [len(t) for t in texts]  # the generated tokens' offsets count from the echoed prompt's end
        async for batch in session.batches():
            for d in batch:
                texts[d.index] += d.text
        if session.disconnected:
            return None
        choices = []
        for i, (c, text) in enumerate(zip(session.choices, texts)):
            if req.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text}}
                choice["logprobs"] = {"content": self._chat_logprobs(c.logprobs)} if req.logprobs else None
            else:
                entries = [(t, lp, o + echoed[i]) for t, lp, o in c.logprobs]
                if prompt_lp is not None:
                    entries = prompt_lp[i // req.n] + entries
                choice = {"index": i, "text": text, "logprobs": self._logprobs(entries) if req.logprobs else None}
            choices.append({**choice, "finish_reason": c.finish_reason})
        obj = "chat.completion" if req.chat else "text_completion"
        return {**meta, "object": obj, "choices": choices, "usage": session.usage()}

    async def _stream(
        self, session: _Session, meta: dict[str, Any], prompt_lp: list | None = None
    ) -> AsyncIterator[str]:
        req = session.req
        obj = "chat.completion.chunk" if req.chat else "text_completion"
        texts = [self.api.decode(req.prompts[i // req.n]) if req.echo else "" for i in range(len(session.choices))]
        echoed = [len(t) for t in texts]  # the generated tokens' offsets count from the echoed prompt's end

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            return _sse({**meta, "object": obj, "choices": choices, **extra})

        try:
            if req.chat:  # the first chunk of each choice names the role, as OpenAI's does
                first = [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(len(session.choices))
                ]
                yield chunk(first)
            elif req.echo:
                first = [
                    {
                        "index": i,
                        "text": text,
                        "logprobs": self._logprobs(prompt_lp[i // req.n]) if prompt_lp is not None else None,
                        "finish_reason": None,
                    }
                    for i, text in enumerate(texts)
                ]
                yield chunk(first)
            try:
                async for batch in session.batches():
                    yield "".join(self._chunk(req, d, chunk, echoed[d.index]) for d in batch)
            except Exception as e:  # the status line is sent; the error goes in the stream, as OpenAI does
                log.exception("generation failed mid-stream")
                yield _sse(APIError(f"generation failed: {e}", status=500, kind="server_error").body())
            if session.disconnected:
                return
            if req.include_usage:
                yield chunk([], usage=session.usage())
            yield "data: [DONE]\n\n"
        finally:
            session.close()

    def _chunk(
        self, req: GenerationRequest, d: _Delta, chunk: Callable[[list[dict[str, Any]]], str], echoed: int = 0
    ) -> str:
        if req.chat:
            lp = {"content": self._chat_logprobs(d.logprobs)} if req.logprobs else None
            body = {"index": d.index, "delta": {"content": d.text} if d.text else {}, "logprobs": lp}
        else:
            lp = self._logprobs([(t, p, o + echoed) for t, p, o in d.logprobs]) if req.logprobs else None
            body = {"index": d.index, "text": d.text, "logprobs": lp}
        return chunk([{**body, "finish_reason": d.finish_reason}])

    def _logprobs(self, entries: list[tuple[int, float | None, int]]) -> dict[str, Any]:
        """Completions' logprobs object: the chosen tokens only (``top_logprobs`` is null)."""
        return {
            "tokens": [self.api.token_text(t) for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": None,
            "text_offset": [o for _, _, o in entries],
        }

    def _chat_logprobs(self, entries: list[tuple[int, float, int]]) -> list[dict[str, Any]]:
        out = []
        for t, lp, _ in entries:
            text = self.api.token_text(t)
            out.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []})
        return out


async def _json(request: Request) -> object:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"expected a JSON request body, got malformed JSON ({e})") from e


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(APIError(message, status=exc.status_code, code=code).body(), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("request failed", exc_info=exc)
    err = APIError(f"internal error: {type(exc).__name__}: {exc}", status=500, kind="server_error")
    return JSONResponse(err.body(), status_code=500)


class _RequireKey:
    """ASGI middleware: /v1/ requests without ``Authorization: Bearer <key>`` get OpenAI's 401."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):  # constant time: the key is not guessed by timing
                message = "expected the server's API key as 'Authorization: Bearer KEY'"
                err = APIError(message, status=401, code="invalid_api_key")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, tokenizer: Tokenizer, config: ServeConfig) -> Starlette:
    """The ASGI app; its scheduler thread runs while the app is being served (``app.state.scheduler``)."""
    scheduler = Scheduler(engine)
    server = Server(scheduler, OpenAIAPI(tokenizer, config))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        scheduler.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            scheduler.stop()

    routes = [
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{model:path}", server.model, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/health", server.health, methods=["GET"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    middleware = [Middleware(_RequireKey, key=config.api_key)] if config.api_key else []
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan, middleware=middleware)
    app.state.scheduler = scheduler
    return app
