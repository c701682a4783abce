"""notelab.lm.engine: continuous batching gives each request the tokens it gets alone, whoever joins or leaves."""

import dataclasses

import pytest
import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.lm import Llama, LlamaConfig, generate
from notelab.lm.engine import FOLDED, Engine, SamplingParams, TokenEvent, rotated_attention


def model_of(dtype=torch.float32, device="cpu") -> Llama:
    cfg = LlamaConfig(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64)
    torch.manual_seed(0)
    model = Llama(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.to(device)


def run(engine: Engine, events: dict[int, list[TokenEvent]], steps: int | None = None) -> None:
    """Step ``steps`` times (or until no work is left), filing the events by request."""
    n = 0
    while engine.has_work() and (steps is None or n < steps):
        for e in engine.step():
            events.setdefault(e.request_id, []).append(e)
        n += 1


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [e.token for e in events if e.token is not None]


def test_requests_joining_and_leaving_get_their_tokens_alone():
    model = model_of()
    engine = Engine(model, max_batch=2)
    prompts = [[5, 6, 7], list(range(1, 12)), [9, 9], [40, 41, 42, 43]]
    budgets = [4, 9, 6, 5]
    events: dict[int, list[TokenEvent]] = {}
    ids = [engine.add(prompts[i], SamplingParams(max_new_tokens=budgets[i])) for i in range(3)]
    run(engine, events, steps=2)  # the third waits in the queue for a free row
    assert ids[2] not in events and len(events[ids[0]]) >= 2
    ids.append(engine.add(prompts[3], SamplingParams(max_new_tokens=budgets[3])))  # joins mid-way
    run(engine, events)
    for rid, p, n in zip(ids, prompts, budgets):
        assert tokens_of(events[rid]) == generate(model, [p], n, path="reference")[0]
        ends = [e for e in events[rid] if e.finished]
        assert ends == [events[rid][-1]] and ends[0].finish_reason == "length"
    assert not engine.has_work()


def test_no_step_is_launched_past_the_last_requests_length():
    """When every running request gets its last token from the step in flight, no further step is launched: the
    longer request's row counts its prefill token and five decode steps, not six (the shorter one's row, still
    running beside it, computes one step past its end, as rows do while a batch runs on)."""
    engine = Engine(model_of(), max_batch=2)
    for prompt, n in (([5, 6, 7], 4), ([9, 9], 6)):
        engine.add(prompt, SamplingParams(max_new_tokens=n))
    run(engine, {})
    assert engine.count.tolist() == [5, 6]


def test_cancel_frees_the_row_and_stop_tokens_end_a_request():
    model = model_of()
    engine = Engine(model, max_batch=1)
    a = engine.add([1, 2, 3], SamplingParams(max_new_tokens=30))
    b = engine.add([4, 5], SamplingParams(max_new_tokens=5))
    events: dict[int, list[TokenEvent]] = {}
    run(engine, events, steps=2)
    assert b not in events  # one row: b waits
    engine.cancel(a)
    before = len(events[a])
    run(engine, events)
    assert len(events[a]) == before and not events[a][-1].finished  # nothing more for a after the cancel
    assert tokens_of(events[b]) == generate(model, [[4, 5]], 5, path="reference")[0]
    want = generate(model, [[1, 2, 3]], 8, path="reference")[0]
    stop = want[4]
    c = engine.add([1, 2, 3], SamplingParams(max_new_tokens=8, stop_tokens=(stop,)))
    run(engine, events)
    assert tokens_of(events[c]) == want[: want.index(stop)]
    assert events[c][-1] == TokenEvent(c, None, None, True, "stop")
    q = engine.add([7], SamplingParams())
    engine.cancel(q)  # cancelled while queued: never runs
    assert not engine.has_work() and engine.step() == []


def test_sampled_requests_do_not_depend_on_the_batch_and_logprobs_are_the_models():
    model = model_of()
    params = SamplingParams(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7, logprobs=True)
    alone = Engine(model, max_batch=4)
    rid = alone.add([3, 1, 4, 1, 5], params)
    events: dict[int, list[TokenEvent]] = {}
    run(alone, events)
    together = Engine(model, max_batch=4)
    others = [together.add([2, 7], SamplingParams(max_new_tokens=12, temperature=0.7, seed=s)) for s in (1, 2)]
    events2: dict[int, list[TokenEvent]] = {}  # ids are per engine
    run(together, events2, steps=1)
    rid2 = together.add([3, 1, 4, 1, 5], params)
    run(together, events2)
    assert tokens_of(events[rid]) == tokens_of(events2[rid2])
    assert tokens_of(events[rid]) == generate(model, [[3, 1, 4, 1, 5]], 8, temperature=1.5, top_p=0.9, seed=7)[0]
    assert all(e.logprob is None for e in events2[others[0]])
    seq = [3, 1, 4, 1, 5] + tokens_of(events[rid])
    with torch.no_grad():
        logp = model(torch.tensor([seq]))[0, 4:-1].float().log_softmax(-1)
    want = logp.gather(-1, torch.tensor(seq[5:])[:, None])[:, 0]
    got = torch.tensor([e.logprob for e in events[rid]])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_context_limit_and_bad_input():
    model = model_of()
    engine = Engine(model, max_batch=2, max_len=16)
    rid = engine.add(list(range(1, 11)), SamplingParams(max_new_tokens=20))
    assert engine.context_limited(rid)
    events: dict[int, list[TokenEvent]] = {}
    run(engine, events)
    assert len(tokens_of(events[rid])) == 6 and events[rid][-1].finish_reason == "length"
    with pytest.raises(ShapeError, match="empty"):
        engine.add([], SamplingParams())
    with pytest.raises(ShapeError, match="16"):
        engine.add(list(range(16)), SamplingParams())
    with pytest.raises(ShapeError, match="101"):
        engine.add([1, 101], SamplingParams())
    with pytest.raises(ConfigError, match="top_p"):
        engine.add([1], SamplingParams(temperature=1.0, top_p=0.0))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        engine.add([1], SamplingParams(max_new_tokens=0))
    with pytest.raises(ConfigError, match="max_len"):
        Engine(model, max_batch=2, max_len=65)
    assert not engine.has_work()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_on_cuda_replays_graphs_with_the_reference_tokens():
    model = model_of(device="cuda")
    engine = Engine(model, max_batch=3)
    prompts = [[5, 6, 7], list(range(1, 12)), [9, 9]]
    events: dict[int, list[TokenEvent]] = {}
    ids = [engine.add(p, SamplingParams(max_new_tokens=10)) for p in prompts[:2]]
    run(engine, events, steps=3)
    ids.append(engine.add(prompts[2], SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)))
    run(engine, events)
    for rid, p in zip(ids[:2], prompts):
        assert tokens_of(events[rid]) == generate(model, [p], 10, path="reference")[0]
    want = generate(model, [prompts[2]], 10, temperature=1.0, seed=3, path="reference")[0]
    assert tokens_of(events[ids[2]]) == want


def test_an_engine_built_in_inference_mode_refreshes_its_weights_outside_it():
    model = model_of()
    with torch.inference_mode():
        engine = Engine(model, max_batch=2, stacked=True)
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.weight.mul_(2.0)
    engine.refresh_weights()  # in-place updates of the engine's inference tensors: inside inference mode
    q_rows = model.layers[0].self_attn.q_proj.weight.shape[0]
    assert torch.equal(engine.fused[0][0][:q_rows], model.layers[0].self_attn.q_proj.weight)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_refresh_follows_in_place_changes_and_replaced_parameters():
    """On CUDA (the folded copies): ``refresh_weights`` follows in-place updates and a parameter replaced by a new
    tensor (another address)."""
    model = model_of(device="cuda")
    engine = Engine(model, max_batch=2, stacked=True)
    q = model.layers[0].self_attn.q_proj
    rows = q.weight.shape[0]
    for change in ("in place", "replaced", "in place"):
        with torch.no_grad():
            if change == "in place":
                q.weight.mul_(2.0)
            else:
                q.weight = torch.nn.Parameter(torch.randn_like(q.weight))
        engine.refresh_weights()
        torch.cuda.synchronize()
        want = q.weight * model.layers[0].input_layernorm.weight if engine.layers is FOLDED else q.weight
        torch.testing.assert_close(engine.fused[0][0][:rows], want.to(engine.fused[0][0].dtype), rtol=0, atol=0)


def test_prefill_graphs_need_cuda():
    with pytest.raises(ConfigError, match="prefill_graphs > 0 needs a CUDA device, got cpu"):
        Engine(model_of(), max_batch=2, prefill_graphs=2)
    assert Engine(model_of(), max_batch=2).prefill_graphs == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_prompt_forwards_give_the_reference_tokens():
    """Prompt shapes seen again replay their captured forward (at most two kept, the oldest dropped); every
    request still gets the reference path's tokens, in whichever rows it lands."""
    model = model_of(device="cuda")
    engine = Engine(model, max_batch=3, prefill_graphs=2)
    rounds = [[[5, 6, 7]], [[1, 2, 3, 4], [8, 8, 8, 8]], [[9, 9, 4]], [[2, 3, 4], [3, 4, 5]], [[7, 7, 7]]]
    for prompts in rounds:
        events: dict[int, list[TokenEvent]] = {}
        ids = [engine.add(p, SamplingParams(max_new_tokens=6)) for p in prompts]
        run(engine, events)
        for rid, p in zip(ids, prompts):
            assert tokens_of(events[rid]) == generate(model, [p], 6, path="reference")[0], p
    assert list(engine.prefills) == [(2, 3), (1, 3)]  # (1, 3) seen three times, replayed twice; (2, 4) dropped


@pytest.mark.parametrize("variant", [{}, dict(norm="layernorm", mlp="gelu", pos="learned")])
def test_stacked_projections_give_the_reference_tokens_and_follow_weight_changes(variant):
    cfg = LlamaConfig(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64)
    torch.manual_seed(0)
    model = Llama(dataclasses.replace(cfg, **variant)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    prompts = [[5, 6, 7], list(range(1, 12))]
    engine = Engine(model, max_batch=2, stacked=True)
    for _ in range(2):
        events: dict[int, list[TokenEvent]] = {}
        ids = [engine.add(p, SamplingParams(max_new_tokens=8)) for p in prompts]
        run(engine, events)
        assert [tokens_of(events[i]) for i in ids] == generate(model, prompts, 8, path="reference")
        with torch.no_grad():  # in place, as an optimizer step: the stacked copies follow after refresh_weights
            for layer in model.layers:
                layer.self_attn.k_proj.weight.mul_(-0.5)
                next(layer.mlp.parameters()).mul_(-1.0)  # gate_proj (SwiGLU), fc1 (GELU)
        engine.refresh_weights()


def test_an_injected_attention_computes_the_stacked_steps_attention():
    """``Engine(attention=...)``: every layer's attention goes through it (counted) and, computed as the engine's
    own, gives the reference tokens; an engine without the stacked step refuses it in one line."""
    model = model_of()
    calls = []

    def counted(q, k, v, cache, pos, rope):
        calls.append(q.shape)
        return rotated_attention(q, k, v, cache, pos, rope)

    prompts = [[5, 6, 7], list(range(1, 12))]
    engine = Engine(model, max_batch=2, stacked=True, attention=counted)
    events: dict[int, list[TokenEvent]] = {}
    ids = [engine.add(p, SamplingParams(max_new_tokens=6)) for p in prompts]
    run(engine, events)
    assert [tokens_of(events[i]) for i in ids] == generate(model, prompts, 6, path="reference")
    n_layers = model.config.n_layers
    assert len(calls) % n_layers == 0 and len(calls) >= n_layers * 5  # one a layer, >= 5 decode steps
    with pytest.raises(ConfigError, match="attention is part of the stacked step"):
        Engine(model, max_batch=2, stacked=False, attention=counted)
