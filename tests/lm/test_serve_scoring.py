"""`notelab lm serve` scoring a given text: completions with echo + logprobs=0 (max_tokens=0: scoring only)."""

import json

import pytest
import torch
from openai import OpenAI
from test_serve import CONTEXT, TEXTS, LiveServer

from notelab.data.tokenizer import Tokenizer
from notelab.eval.logprobs import token_logprobs
from notelab.lm import generate
from notelab.lm.config import LlamaConfig
from notelab.lm.engine import Engine
from notelab.lm.model import Llama
from notelab.lm.openai_api import ServeConfig
from notelab.lm.serve import create_app


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(1)
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    model = Llama(
        LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, multiple_of=32, max_seq_len=CONTEXT)
    ).eval()
    config = ServeConfig(model_name="tiny", context_len=CONTEXT, vocab_size=model.config.vocab_size, max_n=4)
    live = LiveServer(create_app(Engine(model, max_batch=4), tok, config))
    client = OpenAI(base_url=f"http://127.0.0.1:{live.port}/v1", api_key="x", max_retries=0, timeout=30)
    yield dict(model=model, tok=tok, client=client)
    live.close()


def direct_logprobs(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1]
    return token_logprobs(logits, torch.tensor(ids[1:])).tolist()


def test_max_tokens_zero_with_echo_scores_the_prompt(served):
    tok, model = served["tok"], served["model"]
    text = "def add(a, b):\n    return a + b"
    ids = tok.encode(text, add_bos=True)
    out = served["client"].completions.create(
        model="tiny", prompt=[text, "hello world"], echo=True, logprobs=0, max_tokens=0, n=2
    )
    assert len(out.choices) == 4 and out.usage.completion_tokens == 0
    first = out.choices[0]
    assert first.text == text and first.finish_reason == "length"
    lp = first.logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[1:] == pytest.approx(direct_logprobs(model, ids), abs=1e-4)
    # offsets: non-decreasing, the BOS at 0, and the texts between them spell the prompt
    ends = lp.text_offset[1:] + [len(first.text)]
    assert "".join(first.text[a:b] for a, b in zip(lp.text_offset, ends)) == text
    assert out.choices[1].logprobs.token_logprobs == lp.token_logprobs  # n copies of one prompt
    assert out.choices[2].text == "hello world"


def test_echo_with_logprobs_and_generation_offsets_count_from_the_echo(served):
    tok, model = served["tok"], served["model"]
    prompt = "import os"
    out = served["client"].completions.create(
        model="tiny", prompt=prompt, echo=True, logprobs=0, max_tokens=6, temperature=0
    )
    c = out.choices[0]
    n_prompt = len(tok.encode(prompt, add_bos=True))
    generated = c.logprobs.tokens[n_prompt:]
    assert c.text.startswith(prompt) and len(generated) == out.usage.completion_tokens
    assert all(o >= len(prompt) for o in c.logprobs.text_offset[n_prompt:])
    prompt_ids = tok.encode(prompt, add_bos=True)
    gen = generate(model, [prompt_ids], 6, stop_tokens=[tok.eos_id])[0]  # the same greedy tokens
    assert len(gen) == len(generated)
    full = direct_logprobs(model, prompt_ids + gen)
    assert c.logprobs.token_logprobs[1:] == pytest.approx(full, abs=1e-4)


def test_streamed_echo_carries_the_prompt_logprobs(served):
    stream = served["client"].completions.create(
        model="tiny", prompt="hello", echo=True, logprobs=0, max_tokens=3, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].text == "hello" and chunks[0].choices[0].logprobs.token_logprobs[0] is None


@pytest.mark.parametrize(
    "extra, param",
    [({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 0, "echo": True, "stream": True}, "stream")],
)
def test_max_tokens_zero_needs_echo_and_no_stream(served, extra, param):
    import http.client

    port = int(str(served["client"].base_url).split(":")[2].split("/")[0])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "tiny", "prompt": "hi", **extra}))
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 400 and body["error"]["param"] == param


def test_serve_takes_allow_large_to_the_loading(served, tmp_path, monkeypatch):
    import notelab.core.limits
    from notelab.cli import build_parser
    from notelab.cli.lm_serve import _app
    from notelab.core.errors import ConfigError

    folder = tmp_path / "ckpt"
    served["model"].save_pretrained(folder)
    served["tok"].save(folder)
    monkeypatch.setattr(notelab.core.limits, "size_bound", lambda nbytes: (1000, "a bound of 1000 for the test"))
    args = ["lm", "serve", "--checkpoint", str(folder), "--device", "cpu", "--max-batch", "1", "--max-len", "8"]
    with pytest.raises(ConfigError, match="--allow-large"):
        _app(build_parser().parse_args(args))
    app, what = _app(build_parser().parse_args([*args, "--allow-large"]))
    assert "'ckpt'" in what and app.state.scheduler is not None
