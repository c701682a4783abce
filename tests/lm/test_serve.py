"""`notelab lm serve`: a real server on 127.0.0.1, spoken to with the official `openai` client."""

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch
import uvicorn
from openai import AsyncOpenAI, OpenAI

from notelab.data.tokenizer import Tokenizer
from notelab.lm import generate
from notelab.lm.chat import chat_stop_tokens, encode_chat
from notelab.lm.config import LlamaConfig
from notelab.lm.engine import Engine
from notelab.lm.model import Llama
from notelab.lm.openai_api import ServeConfig, TextStream
from notelab.lm.serve import create_app

CONTEXT = 96
TEXTS = ["def add(a, b):\n    return a + b\n", "hello world, the user asked a question", "import os, sys"] * 30


class SlowEngine(Engine):
    """The real engine, slowed down so a test can act while a request is still running."""

    delay = 0.0
    fail = False  # the next step raises

    def step(self):
        if self.fail:
            self.fail = False
            raise RuntimeError("device lost")
        if self.delay:
            time.sleep(self.delay)
        return super().step()


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port, in a thread."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    model = Llama(
        LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, multiple_of=32, max_seq_len=CONTEXT)
    )
    model.eval()
    folder = tmp_path_factory.mktemp("serve") / "tiny-llama"
    model.save_pretrained(folder)
    tok.save(folder)
    engine = SlowEngine(model, max_batch=8)
    config = ServeConfig(model_name="tiny", context_len=CONTEXT, vocab_size=model.config.vocab_size, max_n=4)
    app = create_app(engine, tok, config)
    live = LiveServer(app)
    client = OpenAI(base_url=f"http://127.0.0.1:{live.port}/v1", api_key="x", max_retries=0, timeout=60)
    yield dict(model=model, tok=tok, engine=engine, app=app, port=live.port, client=client, folder=folder)
    live.close()


def reference(setup, prompt, n, stops=None):
    """Token ids from `notelab.lm.generate` alone (greedy) and their text."""
    tok = setup["tok"]
    stops = [tok.eos_id] if stops is None else stops
    ids = generate(setup["model"], [prompt], n, stop_tokens=stops)[0]
    return ids, tok.decode(ids)


def prompt_ids(setup, text):
    return setup["tok"].encode(text, add_bos=True)


def wait_idle(setup, timeout=10.0):
    deadline = time.monotonic() + timeout
    while setup["app"].state.scheduler.active or setup["engine"].has_work():
        assert time.monotonic() < deadline, "the engine still has work"
        time.sleep(0.01)


def post(setup, path, body, method="POST"):
    """(status, parsed JSON) of a raw request; ``body`` bytes go as they are."""
    conn = http.client.HTTPConnection("127.0.0.1", setup["port"], timeout=30)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"null")
    conn.close()
    return out


def test_models_lists_the_checkpoint(setup):
    models = setup["client"].models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert setup["client"].models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        setup["client"].models.retrieve("gpt-4")


def test_greedy_completion_equals_generate(setup):
    ids = prompt_ids(setup, "def add(a")
    ref_ids, ref_text = reference(setup, ids, 20)
    out = setup["client"].completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0)
    assert out.choices[0].text == ref_text
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(ref_ids)
    assert out.choices[0].finish_reason == ("length" if len(ref_ids) == 20 else "stop")
    # the same prompt as text (the server adds <|begin_of_text|>), streamed
    chunks = list(
        setup["client"].completions.create(
            model="tiny",
            prompt="def add(a",
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref_text
    assert chunks[-1].usage.completion_tokens == len(ref_ids) and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        out.choices[0].finish_reason
    ]


def test_logprobs_are_the_models(setup):
    ids = prompt_ids(setup, "hello")
    out = setup["client"].completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, logprobs=0)
    lp = out.choices[0].logprobs
    ref_ids, _ = reference(setup, ids, 6)
    with torch.no_grad():
        logits = setup["model"](torch.tensor([ids + ref_ids]))[0].float().log_softmax(-1)
    expected = [logits[len(ids) - 1 + i, t].item() for i, t in enumerate(ref_ids)]
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert "".join(lp.tokens) == out.choices[0].text or len(lp.tokens) == len(ref_ids)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_equals_generate_streaming_and_not(setup):
    tok = setup["tok"]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    ids = encode_chat(tok, messages)
    ref_ids, ref_text = reference(setup, ids, 12, chat_stop_tokens(tok))
    out = setup["client"].chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == ref_text
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(ref_ids)
    stream = setup["client"].chat.completions.create(
        model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True, logprobs=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref_text
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices[0].logprobs) == len(ref_ids)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_echo_and_seeded_sampling(setup):
    client = setup["client"]
    ids = prompt_ids(setup, "import os")
    _, ref_text = reference(setup, ids, 24)
    stop = ref_text[4:6]
    expected = ref_text[: ref_text.find(stop)]
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0, stop=[stop, "never"])
    assert out.choices[0].text == expected and out.choices[0].finish_reason == "stop"
    chunks = client.completions.create(model="tiny", prompt=ids, max_tokens=24, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected
    echo = client.completions.create(model="tiny", prompt="import os", max_tokens=3, temperature=0, echo=True)
    assert echo.choices[0].text.startswith("import os")
    # a text prompt is raw model input: a pre-rendered chat template gives the chat endpoint's tokens
    tok, messages = setup["tok"], [{"role": "user", "content": "hello"}]
    rendered = tok.decode(encode_chat(tok, messages), skip_special_tokens=False).removeprefix("<|begin_of_text|>")
    stops = {"stop_token_ids": chat_stop_tokens(tok)}  # vLLM's extension, through the client's extra_body
    raw = client.completions.create(model="tiny", prompt=rendered, max_tokens=8, temperature=0, extra_body=stops)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert (
        raw.usage.prompt_tokens == chat.usage.prompt_tokens and raw.choices[0].text == chat.choices[0].message.content
    )
    kw = dict(model="tiny", prompt=ids, max_tokens=8, temperature=1.0, top_p=0.9, n=2, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and [c.index for c in a.choices] == [0, 1]
    wait_idle(setup)


def test_a_list_of_prompts_gives_n_choices_each_in_order(setup):
    prompts = [prompt_ids(setup, "def "), prompt_ids(setup, "hello")]
    refs = [reference(setup, p, 6)[1] for p in prompts]
    out = setup["client"].completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == [refs[0], refs[0], refs[1], refs[1]]
    assert out.usage.prompt_tokens == sum(map(len, prompts))
    chat = setup["client"].chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}], max_completion_tokens=3
    )
    assert chat.usage.completion_tokens <= 3


def test_eight_concurrent_streams_are_batched_and_exact(setup):
    texts = ["def ", "hello", "import", "return a", "world,", "the user", "sys", "add(a, b)"]
    prompts = [prompt_ids(setup, t) for t in texts]
    refs = [reference(setup, p, 16)[1] for p in prompts]
    scheduler = setup["app"].state.scheduler
    steps0 = scheduler.steps

    async def one(client, p):
        stream = await client.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def main():
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{setup['port']}/v1", api_key="x", max_retries=0, timeout=60)
        return await asyncio.gather(*(one(client, p) for p in prompts))

    assert asyncio.run(main()) == refs
    # 8 x 16 tokens one request at a time would take 8 x 16 steps; batched they share them
    assert scheduler.steps - steps0 < 4 * 16


def test_disconnect_frees_the_slot_and_the_others_finish(setup):
    engine, scheduler = setup["engine"], setup["app"].state.scheduler
    candidates = [prompt_ids(setup, t) for t in ("def ", "import", "hello", "sys", "the", "world")]
    long_prompt = next(p for p in candidates if len(reference(setup, p, 60)[0]) == 60)
    other = prompt_ids(setup, "return a")
    _, other_ref = reference(setup, other, 30)
    engine.delay = 0.01  # 60 steps >= 0.6 s: the client leaves long before its request could end
    try:
        steps0 = scheduler.steps
        results = {}

        def run_other():
            chunks = setup["client"].completions.create(
                model="tiny", prompt=other, max_tokens=30, temperature=0, stream=True
            )
            results["other"] = "".join(c.choices[0].text for c in chunks)

        t = threading.Thread(target=run_other)
        t.start()
        stream = setup["client"].completions.create(
            model="tiny", prompt=long_prompt, max_tokens=60, temperature=0, stream=True
        )
        for i, _ in enumerate(stream):
            if i == 2:
                break
        stream.close()  # the client goes away mid-stream
        t.join(30)
        assert results["other"] == other_ref
        wait_idle(setup)  # the scheduler and the engine let go of the abandoned request
        assert not engine.requests and all(r is None for r in engine.rows)
        assert scheduler.steps - steps0 < 50  # the long request did not run to its 60 tokens
    finally:
        engine.delay = 0.0


def test_a_client_that_never_reads_blocks_nobody(setup):
    setup["engine"].delay = 0.005
    try:
        prompt = prompt_ids(setup, "def ")
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 80, "n": 4, "temperature": 0, "stream": True}
        body = json.dumps({**body, "logprobs": 0}).encode()
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little room in the kernel for its bytes
        stalled.connect(("127.0.0.1", setup["port"]))
        head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        stalled.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)  # and reads nothing yet
        ids = prompt_ids(setup, "hello")
        out = setup["client"].completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
        assert out.choices[0].text == reference(setup, ids, 10)[1]
        wait_idle(setup)  # the engine finished all 4 x 80 tokens while their reader read nothing
        received = b""
        stalled.settimeout(30)
        while b"data: [DONE]" not in received:
            part = stalled.recv(1 << 16)
            assert part, received[-200:]
            received += part
        assert received.count(b'"finish_reason":"') == 4  # each sequence's end (null elsewhere)
        stalled.close()
    finally:
        setup["engine"].delay = 0.0


GOOD = {
    "/v1/completions": {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0},
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
}
BAD = [
    (b'{"model": "tiny", "prompt": ', None, "malformed JSON"),
    (b"[1, 2]", None, "JSON object"),
    ({"prompt": "hi"}, "model", "model"),
    ({"model": "gpt-4", "prompt": "hi"}, "model", "'tiny'"),
    ({"model": "tiny"}, "prompt", "prompt"),
    ({"model": "tiny", "prompt": {"a": 1}}, "prompt", "prompt"),
    ({"model": "tiny", "prompt": [3] * CONTEXT}, "prompt", "context"),
    ({"model": "tiny", "prompt": [3] * 90, "max_tokens": 10}, "max_tokens", "context"),
    ({"model": "tiny", "prompt": [3, 10**6]}, "prompt", "token ids"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": -3}, "max_tokens", "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "5"}, "max_tokens", "integer"),
    ({"model": "tiny", "prompt": "hi", "n": 5}, "n", "at most 4"),
    ({"model": "tiny", "prompt": ["a", "b", "c"], "n": 2}, "n", "at most 4"),
    ({"model": "tiny", "prompt": "hi", "temperature": -0.5}, "temperature", "[0, 2]"),
    ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, "temperature", "number"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p", "(0, 1]"),
    ({"model": "tiny", "prompt": "hi", "top_p": 1.5}, "top_p", "(0, 1]"),
    ({"model": "tiny", "prompt": "hi", "stream": "yes"}, "stream", "true or false"),
    ({"model": "tiny", "prompt": "hi", "logprobs": 3}, "logprobs", "alternatives"),
    ({"model": "tiny", "prompt": "hi", "stop": [1]}, "stop", "stop"),
    ({"model": "tiny", "prompt": "hi", "presence_penalty": 1}, "presence_penalty", "repetition_penalty"),
]
BAD_CHAT = [
    ({"model": "tiny", "messages": "hi"}, "messages", "messages"),
    ({"model": "tiny", "messages": []}, "messages", "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages", "role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, "messages", "content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x " * 200}]}, "messages", "context"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs", "0"),
]


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [("/v1/completions", *b) for b in BAD] + [("/v1/chat/completions", *b) for b in BAD_CHAT],
)
def test_bad_input_is_a_400_and_the_server_goes_on(setup, path, body, param, words):
    status, out = post(setup, path, body)
    assert status == 400, out
    err = out["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    status, ok = post(setup, path, GOOD[path])  # and the server goes on
    assert status == 200 and ok["usage"]["completion_tokens"] >= 0 and ok["choices"][0]["finish_reason"]


def test_errors_reach_the_openai_client_and_unknown_routes_are_404(setup):
    client = setup["client"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=0)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    status, out = post(setup, "/v1/embeddings", {"model": "tiny"})
    assert status == 404 and out["error"]["code"] == "not_found"
    status, out = post(setup, "/v1/completions", None, method="GET")
    assert status == 405 and out["error"]["type"] == "invalid_request_error"
    ok = client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens >= 1 or ok.choices[0].finish_reason == "stop"
    wait_idle(setup)


def test_an_engine_failure_is_a_500_and_the_server_goes_on(setup):
    setup["engine"].fail = True
    status, out = post(setup, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 3})
    assert status == 500 and out["error"]["type"] == "server_error" and "device lost" in out["error"]["message"]
    wait_idle(setup)
    ids = prompt_ids(setup, "hello")
    ok = setup["client"].completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert ok.choices[0].text == reference(setup, ids, 5)[1]


def test_api_key_is_required_when_set(setup):
    config = ServeConfig(model_name="tiny", context_len=CONTEXT, vocab_size=300, api_key="s3cret")
    live = LiveServer(create_app(Engine(setup["model"], max_batch=2), setup["tok"], config))
    try:
        url = f"http://127.0.0.1:{live.port}/v1"
        with pytest.raises(openai.AuthenticationError) as e:
            OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        client = OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
    finally:
        live.close()


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    ids = tok.encode("héllo wörld ✓ done")
    s = TextStream(tok.decode)
    deltas = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(deltas) == tok.decode(ids) and all("\ufffd" not in d for d in deltas)
    s = TextStream(tok.decode, stop=["wör"])
    out = "".join(s.push(i) for i in ids) + s.flush()
    assert out == "héllo " and s.stopped


def test_cli_serves_a_checkpoint(setup):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # on the CPU in float32, as the reference it is compared with, also on a GPU machine
    cmd = [sys.executable, "-m", "notelab", "lm", "serve", "--checkpoint", str(setup["folder"]), "--device", "cpu"]
    cmd += ["--port", "0", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # "serving 'tiny-llama' (...) at http://127.0.0.1:PORT/v1", once loaded
        assert "serving 'tiny-llama'" in line, line + proc.stdout.read()
        client = OpenAI(base_url=line.split(" at ")[-1].strip(), api_key="x", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["tiny-llama"]
        ids = prompt_ids(setup, "def ")
        out = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=8, temperature=0)
        assert out.choices[0].text == reference(setup, ids, 8)[1]
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_bad_address_is_one_line_before_loading(setup, capsys):
    import notelab.cli as cli

    args = ["lm", "serve", "--checkpoint", str(setup["folder"])]
    assert cli.main([*args, "--port", "70000"]) == 2
    assert capsys.readouterr().err.startswith("error: --port")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert cli.main([*args, "--port", str(busy.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host/--port") and "in use" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["lm", "serve", "--checkpoint", str(setup["folder"] / "nope")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
