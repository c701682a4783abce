import pytest

from notelab.core.errors import DataError
from notelab.data.tokenizer import Tokenizer
from notelab.lm.chat import apply_chat_template, chat_stop_tokens, encode_chat


def test_llama3_template_exact_string():
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2+2?\n"},
        {"role": "assistant", "content": "4"},
    ]
    expected = (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    )
    assert apply_chat_template(messages) == expected
    gen = apply_chat_template(messages[:2], add_generation_prompt=True)
    assert gen.endswith("What is 2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_bad_messages_raise():
    with pytest.raises(DataError, match="role"):
        apply_chat_template([{"role": "robot", "content": "hi"}])
    with pytest.raises(DataError, match="messages\\[0\\]"):
        apply_chat_template([{"content": "hi"}])


def test_encode_chat_uses_special_token_ids():
    tok = Tokenizer.train(["hello world, the user asked a question"] * 20, vocab_size=300)
    ids = encode_chat(tok, [{"role": "user", "content": "hello"}])
    assert ids[0] == tok.bos_id
    assert tok.token_to_id("<|eot_id|>") in ids
    assert tok.decode(ids, skip_special_tokens=False).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.token_to_id("<|eot_id|>") in chat_stop_tokens(tok)
