"""``notelab lm serve``: an OpenAI-compatible HTTP server for a checkpoint (see :mod:`notelab.lm.serve`).

    notelab lm serve --checkpoint DIR [--host 127.0.0.1] [--port 8000] [--model-name NAME]
                     [--max-batch 64] [--max-len N] [--max-n 16] [--dtype auto] [--device auto] [--api-key KEY]

Then, from any OpenAI client::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="DIR's name", messages=[{"role": "user", "content": "hi"}])
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from notelab.cli.common import add_dtype_option, add_model_options, apply_dtype
from notelab.core.errors import ConfigError, DataError

# Llama 3's 128k-token context in every one of 64 rows would be a KV cache of ~0.5 TB for the 1B model.
DEFAULT_MAX_LEN = 4096


def add_serve_parser(verbs: argparse._SubParsersAction) -> None:
    s = verbs.add_parser(
        "serve",
        help="serve a checkpoint over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, /v1/models)",
        description=(
            "An OpenAI-compatible HTTP server with continuous batching: concurrent requests share the decode "
            "batch, joining and leaving it between steps. Point an OpenAI client at http://HOST:PORT/v1."
        ),
    )
    s.add_argument("--checkpoint", required=True, help="a run directory (model + tokenizer.json)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (0: a free one, printed)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (the client's api_key)")
    s.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    s.add_argument("--max-batch", type=int, default=64, help="most sequences decoded together; more wait their turn")
    s.add_argument(
        "--max-len",
        type=int,
        help=f"longest prompt + completion in tokens; the KV cache holds max-batch x max-len tokens "
        f"(default: the model's max_seq_len, at most {DEFAULT_MAX_LEN})",
    )
    s.add_argument("--max-n", type=int, default=16, help="most sequences one request may ask for (n x prompts)")
    add_dtype_option(s)
    s.add_argument("--device", default="auto")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_model_options(s)
    s.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    for name in ("max_batch", "max_len", "max_n"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected a positive integer, got {value}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: expected a port in [0, 65535], got {args.port}")
    if not Path(args.checkpoint).is_dir():
        raise DataError(f"--checkpoint: expected a checkpoint directory, got {args.checkpoint!r} (no such directory)")
    with _listen(args.host, args.port) as sock:  # before the model loads: a busy port fails at once
        import uvicorn

        app, what = _app(args)
        print(f"serving {what} at http://{args.host}:{sock.getsockname()[1]}/v1", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
    return 0


def _app(args: argparse.Namespace) -> tuple[object, str]:
    """The server's ASGI app over the checkpoint, and a line saying what it serves."""
    from notelab.core.runtime import get_device
    from notelab.lm.engine import Engine
    from notelab.lm.flops import kv_cache_bytes
    from notelab.lm.openai_api import ServeConfig
    from notelab.lm.serve import create_app
    from notelab.lm.train import load_run

    model, tokenizer = load_run(args.checkpoint, device=get_device(args.device), allow_large=args.allow_large)
    context = model.config.max_seq_len
    if args.max_len is not None and not 2 <= args.max_len <= context:
        raise ConfigError(f"--max-len: expected 2 to the model's max_seq_len {context}, got {args.max_len}")
    max_len = args.max_len or min(context, DEFAULT_MAX_LEN)
    apply_dtype(model, args.dtype).eval()
    # requests' prompts seldom repeat their (length, count) shape: their forwards run eagerly, not recorded
    engine = Engine(model, max_batch=args.max_batch, max_len=max_len, prefill_graphs=0)
    cache = kv_cache_bytes(model.config, args.max_batch, max_len, engine.dtype)
    name = args.model_name or Path(args.checkpoint).resolve().name
    config = ServeConfig(
        model_name=name,
        context_len=max_len,
        vocab_size=model.config.vocab_size,
        max_n=args.max_n,
        api_key=args.api_key,
    )
    what = f"{name!r} (batches of up to {args.max_batch}, context {max_len} tokens, KV cache {cache / 2**30:.2f} GiB)"
    return create_app(engine, tokenizer, config), what


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), or a one-line ConfigError."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise ConfigError(f"--host/--port: expected an address to listen on, got {host}:{port} ({e})") from e
