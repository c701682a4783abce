"""OpenAICompatLM: against a real `notelab lm serve` (same greedy text and log-probabilities as NotelabLM in process),
and against local sockets that are dead, slow, trickling, or answer garbage (one clear error, in bounded time)."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from notelab.core.errors import ConfigError
from notelab.data.tokenizer import Tokenizer
from notelab.hallucination import EndpointError, Generation, NotelabLM, OpenAICompatLM
from notelab.lm import generate
from notelab.lm.chat import chat_stop_tokens, encode_chat
from notelab.lm.config import LlamaConfig
from notelab.lm.model import Llama
from notelab.lm.sampling import FactualNucleus

TEXTS = ["The capital of France is Paris.", "def add(a, b):\n    return a + b\n", "import os, sys"] * 20
PAIRS = [("The capital of France is", " Paris."), ("def add(a, b):", "\n    return a + b"), ("import", " os, sys")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny random Llama (float32) saved to a folder, served by the real CLI on a free loopback port."""
    torch.manual_seed(0)
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    model = Llama(
        LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, multiple_of=32, max_seq_len=96)
    ).eval()
    folder = tmp_path_factory.mktemp("served") / "tiny"
    model.save_pretrained(folder)
    tok.save(folder)
    cmd = [sys.executable, "-m", "notelab", "lm", "serve", "--checkpoint", str(folder), "--device", "cpu"]
    cmd += ["--port", "0", "--log-level", "warning", "--max-batch", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving 'tiny'" in line, line + proc.stdout.read()
        url = line.split(" at ")[-1].strip()
        local = NotelabLM(Llama.from_pretrained(folder).eval(), tok, name="tiny")
        yield dict(url=url, local=local, tok=tok)
    finally:
        proc.terminate()
        proc.wait(10)


def test_http_greedy_text_and_logprobs_equal_in_process(served):
    remote = OpenAICompatLM(served["url"], "tiny", timeout=30)
    local = served["local"]
    prompts = ["The capital", "def add(", "import"]
    got = remote.generate(prompts, n=2, max_new_tokens=10)
    want = local.generate(prompts, n=2, max_new_tokens=10)
    for g_row, w_row in zip(got, want):
        for g, w in zip(g_row, w_row):
            assert g.text == w.text and g.tokens == w.tokens
            assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    got = remote.logprobs([p for p, _ in PAIRS], [c for _, c in PAIRS])
    want = local.logprobs([p for p, _ in PAIRS], [c for _, c in PAIRS])
    for g, w in zip(got, want):
        assert g.tokens == w.tokens and len(g.tokens) > 0 and g.entropies is None
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
    # more sequences than one request carries: split into several requests, in order
    small = OpenAICompatLM(served["url"], "tiny", timeout=30, max_sequences=2)
    assert small.generate(prompts, n=1, max_new_tokens=10) == remote.generate(prompts, n=1, max_new_tokens=10)
    assert [s.tokens for s in small.logprobs(["a", "b", "c"], [" x", " y", " z"])] == [
        s.tokens for s in remote.logprobs(["a", "b", "c"], [" x", " y", " z"])
    ]
    sampled = remote.generate(["def "], n=3, temperature=1.0, top_p=0.9, max_new_tokens=6)[0]
    assert len(sampled) == 3 and all(isinstance(g, Generation) for g in sampled)
    with pytest.raises(ConfigError, match="FactualNucleus"):
        remote.generate(["x"], temperature=1.0, top_p=FactualNucleus())


def test_http_chat_is_the_chat_template(served):
    tok = served["tok"]
    remote = OpenAICompatLM(served["url"], "tiny", timeout=30, chat=True)
    (g,) = remote.generate(["say hi"], max_new_tokens=6)[0]
    ids = encode_chat(tok, [{"role": "user", "content": "say hi"}])
    ref = generate(served["local"].model, [ids], 6, stop_tokens=chat_stop_tokens(tok))[0]
    assert g.text == tok.decode(ref) and len(g.logprobs) == len(ref)


def test_a_4xx_from_the_server_is_one_line_naming_the_field(served):
    with pytest.raises(EndpointError, match="HTTP 400: model: expected 'tiny'") as e:
        OpenAICompatLM(served["url"], "other").generate(["x"])
    assert "\n" not in str(e.value)


# --- misbehaving endpoints ------------------------------------------------------------------------------------


class Scripted:
    """An HTTP server on loopback answering POSTs with the scripted (status, body) pairs, the last one repeated."""

    def __init__(self, answers):
        self.answers, self.count, self.headers = list(answers), 0, None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, body = outer.answers[min(outer.count, len(outer.answers) - 1)]
                outer.count += 1
                outer.headers = dict(self.headers)
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def completion(text, logprobs=None):
    return {"choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "stop"}]}


def timed(fn):
    start = time.monotonic()
    with pytest.raises(EndpointError) as e:
        fn()
    return time.monotonic() - start, str(e.value)


def test_dead_endpoint_fails_after_bounded_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    lm = OpenAICompatLM(f"http://127.0.0.1:{port}/v1", "m", timeout=1.0, retries=2, backoff=0.1)
    elapsed, message = timed(lambda: lm.generate(["x"]))
    assert elapsed < 2.0 and "gave up after 3 attempts: cannot connect" in message and "\n" not in message


def test_a_server_that_accepts_and_never_answers_times_out():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody reads or writes
        lm = OpenAICompatLM(f"http://127.0.0.1:{silent.getsockname()[1]}/v1", "m", timeout=0.5, retries=2)
        elapsed, message = timed(lambda: lm.logprobs(["a"], ["b"]))
    assert 0.4 < elapsed < 1.5 and "within the timeout of 0.5 s" in message  # a slow answer is not retried


def test_a_trickling_answer_is_cut_at_the_timeout():
    stop = threading.Event()
    server = socket.create_server(("127.0.0.1", 0))

    def trickle():
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while not stop.wait(0.05):  # one byte at a time, never the whole body
            conn.sendall(b" ")
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    try:
        lm = OpenAICompatLM(f"http://127.0.0.1:{server.getsockname()[1]}/v1", "m", timeout=0.5, retries=0)
        elapsed, message = timed(lambda: lm.generate(["x"]))
    finally:
        stop.set()
        server.close()
    assert 0.4 < elapsed < 1.5 and "timeout" in message


@pytest.mark.parametrize(
    "answer, words",
    [
        (b"<html>hello</html>", "expected a JSON answer, got '<html>hello</html>'"),
        ([1, 2], "expected a JSON object"),
        ({"choices": 3}, 'expected "choices" as list'),
        ({"choices": []}, 'expected 1 entries in "choices", got 0'),
        ({"choices": [{"index": 0, "text": 5}]}, 'expected "text" of a choice as str'),
        (completion("x", {"tokens": ["a"], "token_logprobs": [], "text_offset": [0]}), "of one length"),
    ],
)
def test_garbage_answers_are_one_clear_line(answer, words):
    server = Scripted([(200, answer)])
    try:
        elapsed, message = timed(lambda: OpenAICompatLM(server.url, "m", timeout=2.0).generate(["x"]))
    finally:
        server.close()
    assert words in message and "\n" not in message and elapsed < 2.0 and server.count == 1


def test_5xx_is_retried_4xx_is_not_and_empty_text_is_valid():
    server = Scripted([(503, {"error": {"message": "busy"}}), (200, completion(""))])
    try:
        lm = OpenAICompatLM(server.url, "m", timeout=2.0, retries=2, backoff=0.05)
        assert lm.generate(["x"]) == [[Generation(text="")]] and server.count == 2
        assert "Authorization" not in server.headers
        OpenAICompatLM(server.url, "m", api_key="s3cret").generate(["x"])
        assert server.headers["Authorization"] == "Bearer s3cret"
        server.count = 0
        server.answers, server.count = [(400, {"error": {"message": "max_tokens: too many"}})], 0
        elapsed, message = timed(lambda: lm.generate(["x"]))
        assert server.count == 1 and "HTTP 400: max_tokens: too many" in message
        server.answers, server.count = [(500, b"oops")], 0
        elapsed, message = timed(lambda: lm.generate(["x"]))
        assert server.count == 3 and "gave up after 3 attempts: HTTP 500: oops" in message
        server.answers = [(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]})]
        assert OpenAICompatLM(server.url, "m", chat=True).generate(["x"]) == [[Generation(text="")]]
    finally:
        server.close()


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="base_url"):
        OpenAICompatLM("localhost:8000", "m")
    with pytest.raises(ConfigError, match="timeout > 0"):
        OpenAICompatLM("http://x/v1", "m", timeout=0)
    with pytest.raises(ConfigError, match="retries >= 0"):
        OpenAICompatLM("http://x/v1", "m", retries=-1)


def test_scoring_reads_the_echo_by_offsets():
    # the server echoed "ab c" and (despite max_tokens=0) generated " d": the continuation " c" alone is scored
    echoed = {
        "tokens": ["<s>", "ab", " c", " d"],
        "token_logprobs": [None, -1.0, -2.0, -3.0],
        "text_offset": [0, 0, 2, 4],
    }
    server = Scripted([(200, completion("ab c d", echoed))])
    try:
        lm = OpenAICompatLM(server.url, "m")
        (s,) = lm.logprobs(["ab"], [" c"])
        assert s.tokens == (" c",) and s.logprobs == (-2.0,) and s.entropies is None
        # no BOS and no prompt: the first token has no context
        server.answers = [(200, completion("ab", {"tokens": ["ab"], "token_logprobs": [None], "text_offset": [0]}))]
        with pytest.raises(ConfigError, match="item 0: expected a prompt"):
            lm.logprobs([""], ["ab"])
    finally:
        server.close()
