"""The HF engine on tiny random Llamas (float32, CPU): steering, hidden states, forks, drops,
control points, finish reasons, stop strings and seeded sampling."""

from __future__ import annotations

import pytest
import torch

from esm_steer.engine.base import FINISH_LENGTH, FINISH_STOP, DecodeBatch, Engine, SamplingSpec
from esm_steer.engine.hf import HFEngine
from esm_steer.engine.segments import control_point_offsets, token_pieces
from esm_steer.seeds import derive_seed


@pytest.fixture(scope="module")
def lively(lively_engine):
    return lively_engine


@pytest.fixture(scope="module")
def prompts(three_prompts):
    return three_prompts


def _plain_forward_logits(model, prompts, pad_id, forced):
    """Left-padded prefill plus one decode step of `forced` tokens, with the model's own
    forward and cache: the reference for an unhooked model."""
    from transformers import DynamicCache

    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, logits_to_keep=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(
            input_ids=torch.tensor(forced)[:, None],
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            past_key_values=cache,
            logits_to_keep=1,
        )
    return out.logits[:, -1].float()


def test_protocols(tiny_engine):
    assert isinstance(tiny_engine, Engine)
    batch = tiny_engine.start([[5, 6, 7]])
    assert isinstance(batch, DecodeBatch)
    assert tiny_engine.info.steer_layer == 1 and tiny_engine.info.num_layers == 2
    assert tiny_engine.info.hidden_size == 64 and tiny_engine.info.backend == "hf"


def test_unsteered_and_zero_rows_bit_identical_to_plain_forward(tiny_engine, tiny_model, prompts):
    batch = tiny_engine.start(prompts)
    r0, r1, r2 = batch.active_rows()
    batch.set_steer(r1, torch.zeros(64))
    batch.set_steer(r2, torch.randn(64))
    forced = [11, 12, 13]
    batch.step(force={r0: 11, r1: 12, r2: 13})
    ref = _plain_forward_logits(tiny_model, prompts, tiny_engine.pad_id, forced)
    assert torch.equal(batch.last_logits(r0), ref[0])
    assert torch.equal(batch.last_logits(r1), ref[1])  # a zero vector adds exactly 0
    assert not torch.allclose(batch.last_logits(r2), ref[2])


def test_steering_one_row_changes_only_that_row(lively, prompts):
    spec = dict(temperature=0.0)
    plain = lively.start(prompts)
    steered = lively.start(prompts)
    rows = steered.active_rows()
    steered.set_steer(rows[1], 50 * torch.randn(64, generator=torch.Generator().manual_seed(0)))
    for _ in range(8):
        plain.step(**spec)
        steered.step(**spec)
    for k in (0, 2):
        assert steered.tokens(rows[k]) == plain.tokens(rows[k])
        assert steered.logprobs(rows[k]) == plain.logprobs(rows[k])  # bit-identical
    assert steered.tokens(rows[1]) != plain.tokens(rows[1])


def test_greedy_matches_model_generate(lively, prompts):
    model, pad = lively.model, lively.pad_id
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    ref = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=pad, eos_token_id=2
    )[:, T:].tolist()
    out = lively.generate(prompts, SamplingSpec(max_new_tokens=16))
    for sample, expect in zip(out, ref):
        expect = expect[: expect.index(2)] if 2 in expect else expect
        assert sample[0].token_ids == expect
    assert len(set(out[0][0].token_ids)) > 4  # the model does not just repeat one token


def test_greedy_logprobs_equal_prompt_logprobs(lively, prompts):
    s = lively.generate(prompts[:1], SamplingSpec(max_new_tokens=10))[0][0]
    seq = prompts[0] + s.token_ids
    teacher = lively.prompt_logprobs([seq])[0]
    assert len(teacher) == len(seq) - 1
    torch.testing.assert_close(torch.tensor(teacher[-10:]), torch.tensor(s.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 3.0])
def test_fork_continues_like_the_original_row(lively, prompts, temperature):
    batch = lively.start(prompts, seed=3)
    for _ in range(3):
        batch.step(temperature)
    r0 = batch.active_rows()[0]
    forks = batch.fork(r0, 2)  # same RNG state: the same draws
    for _ in range(6):
        batch.step(temperature)
    ref = lively.start(prompts, seed=3)  # never forked
    for _ in range(9):
        ref.step(temperature)
    assert len(batch.tokens(r0)) == 9
    for f in forks:
        assert batch.tokens(f) == batch.tokens(r0)
        torch.testing.assert_close(torch.tensor(batch.logprobs(f)), torch.tensor(batch.logprobs(r0)))
    assert batch.tokens(r0) == ref.tokens(ref.active_rows()[0])


def test_fork_many_equals_separate_forks(lively, prompts):
    """One cache select for several rows gives the same rows as one fork call per row."""
    one, many = lively.start(prompts), lively.start(prompts)
    for b in (one, many):
        for _ in range(2):
            b.step()
    rows = one.active_rows()
    v = torch.randn(64)
    sep = {r: one.fork(r, 2) for r in rows[:2]}
    got = many.fork_many({r: 2 for r in rows[:2]})
    assert [len(x) for x in got.values()] == [2, 2]
    for b, forks in ((one, sep), (many, got)):
        b.set_steer(forks[rows[0]][1], v)
    for _ in range(4):
        one.step()
        many.step()
    for r in rows[:2]:
        for a, b in zip(sep[r], got[r]):
            assert one.tokens(a) == many.tokens(b)


def test_fork_copies_steering_and_tracker(lively, prompts):
    batch = lively.start(prompts[:1], segment_delimiter="\n\n")
    r = batch.active_rows()[0]
    v = torch.randn(64)
    batch.set_steer(r, v)
    batch.step()
    (f,) = batch.fork(r, 1)
    batch.step()
    assert batch.tokens(f) == batch.tokens(r)
    torch.testing.assert_close(batch.last_hidden(f), batch.last_hidden(r))
    assert batch.at_control_point(f) == batch.at_control_point(r)
    assert batch._rows[f].tracker.count == batch._rows[r].tracker.count  # the tracker was copied


def test_last_hidden_equals_teacher_forced(lively, prompts):
    batch = lively.start(prompts)
    rows = batch.active_rows()
    captured = {r: [batch.last_hidden(r)] for r in rows}  # the last prompt token
    for _ in range(6):
        batch.step()
        for r in batch.active_rows():
            captured[r].append(batch.last_hidden(r))
    seqs = [p + batch.tokens(r) for p, r in zip(prompts, rows)]
    teacher = lively.hidden_states(seqs)
    for p, r, h in zip(prompts, rows, teacher):
        assert h.dtype == torch.float32 and h.shape == (len(p) + 6, 64)
        got = torch.stack(captured[r])
        torch.testing.assert_close(got, h[len(p) - 1 :], atol=5e-5, rtol=1e-4)  # float32 noise: cache vs full pass


def test_hidden_states_other_layer_and_padding(lively, prompts):
    full = lively.hidden_states(prompts, layer=0)
    alone = [lively.hidden_states([p], layer=0)[0] for p in prompts]
    for a, b in zip(full, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[0], lively.hidden_states(prompts[:1])[0])  # layer 0 != layer 1


def test_control_points_on_forced_text(tiny_engine, tokenizer):
    text = "First, add.\n\nThen 2 + 3 = 5.\n\n\nSo the answer is 5.\n\nDone"
    forced = tokenizer(text, add_special_tokens=False)["input_ids"]
    batch = tiny_engine.start([[5, 6, 7]], segment_delimiter="\n\n")
    r = batch.active_rows()[0]
    flags = []
    for t in forced:
        batch.step(force={r: t})
        flags.append(batch.at_control_point(r))
    expected = control_point_offsets(token_pieces(tokenizer, forced), "\n\n", M=100)[1:]
    assert [j + 1 for j, f in enumerate(flags) if f] == expected
    assert sum(flags) == text.count("\n\n") == 3
    assert tokenizer.decode(batch.tokens(r)) == text


def test_generate_calls_back_at_control_points(lively, prompts, tokenizer):
    ref = lively.generate(prompts[:1], SamplingSpec(max_new_tokens=20))[0][0]
    pieces = token_pieces(tokenizer, ref.token_ids)
    delim = next(p for p in pieces[3:] if p.strip())  # a piece the model emits
    calls = []
    out = lively.generate(
        prompts[:1],
        SamplingSpec(max_new_tokens=20),
        segment_delimiter=delim,
        on_control_point=lambda batch, row: calls.append(len(batch.tokens(row))),
    )[0][0]
    assert out.token_ids == ref.token_ids
    expected = [
        j + 1 for j in range(len(pieces)) if "".join(pieces[: j + 1]).count(delim) > "".join(pieces[:j]).count(delim)
    ]
    assert calls == [e for e in expected if e < 20] and calls


def test_finish_length_counts(lively, prompts):
    out = lively.generate(prompts, SamplingSpec(max_new_tokens=7))
    for p, (s,) in zip(prompts, out):
        assert s.finish_reason == FINISH_LENGTH
        assert s.num_tokens == 7 and len(s.logprobs) == 7
        assert s.num_prompt_tokens == len(p)
        assert s.text == lively.tokenizer.decode(s.token_ids, skip_special_tokens=True)


def test_finish_on_eos(lively, prompts):
    calls = {"n": 0}

    def push_eos(module, args, output):  # from the 4th forward on, EOS wins
        calls["n"] += 1
        if calls["n"] >= 4:
            output = output.clone()
            output[..., 2] = 1e4
        return output

    handle = lively.model.lm_head.register_forward_hook(push_eos)
    try:
        out = lively.generate(prompts, SamplingSpec(max_new_tokens=20))
    finally:
        handle.remove()
    for (s,) in out:
        # forward 1 = prefill -> token 1, forwards 2 and 3 -> tokens 2 and 3, forward 4 -> EOS
        assert s.finish_reason == FINISH_STOP and s.num_tokens == 3 and len(s.logprobs) == 3
        assert 2 not in s.token_ids


def test_eos_by_step_leaves_active_rows(tiny_engine, prompts):
    batch = tiny_engine.start(prompts)
    r0, r1, r2 = batch.active_rows()
    out = batch.step(force={r1: 2})
    assert out[r1] == 2
    assert batch.active_rows() == [r0, r2]
    assert batch.finish_reason(r1) == FINISH_STOP and batch.tokens(r1) == []
    assert batch.last_hidden(r1).shape == (64,)  # kept when the row left the tensors
    batch.finish(r0, FINISH_LENGTH)
    assert batch.active_rows() == [r2] and batch.finish_reason(r0) == FINISH_LENGTH
    with pytest.raises(ValueError):
        batch.fork(r0, 1)


def test_stop_strings_truncate(lively, prompts, tokenizer):
    ref = lively.generate(prompts[:1], SamplingSpec(max_new_tokens=20))[0][0]
    pieces = token_pieces(tokenizer, ref.token_ids)
    k = next(j for j in range(4, len(pieces)) if len(pieces[j].strip()) >= 2)
    stop = pieces[k].strip()[:2]
    first = next(j for j in range(len(pieces)) if stop in "".join(pieces[: j + 1]))
    out = lively.generate(prompts[:1], SamplingSpec(max_new_tokens=20, stop=(stop,)))[0][0]
    assert out.finish_reason == FINISH_STOP
    assert out.token_ids == ref.token_ids[: first + 1]
    full = tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.text == full[: full.find(stop)] and stop not in out.text


def test_samples_reproducible_and_independent_of_batch(lively, prompts):
    spec = SamplingSpec(max_new_tokens=8, temperature=5.0, top_p=0.9, n=3, seed=7)
    a = lively.generate(prompts, spec, prompt_seeds=[10, 11, 12])
    b = lively.generate(prompts, spec, prompt_seeds=[10, 11, 12])
    assert [[s.token_ids for s in r] for r in a] == [[s.token_ids for s in r] for r in b]
    c = lively.generate([prompts[2], prompts[0]], spec, prompt_seeds=[12, 10])
    assert [s.token_ids for s in c[0]] == [s.token_ids for s in a[2]]
    assert [s.token_ids for s in c[1]] == [s.token_ids for s in a[0]]
    assert len({tuple(s.token_ids) for s in a[0]}) == 3  # the n samples differ
    # without prompt_seeds: (spec.seed, i, j); another spec.seed gives other samples
    d = lively.generate(prompts, spec)
    e = lively.generate(prompts, SamplingSpec(max_new_tokens=8, temperature=5.0, top_p=0.9, n=3, seed=8))
    assert [s.token_ids for s in d[1]] != [s.token_ids for s in e[1]]
    small = HFEngine(lively.model, lively.tokenizer, batch_size=2)  # other chunking
    try:
        f = small.generate(prompts, spec)
    finally:
        small._hook.remove()
    assert [[s.token_ids for s in r] for r in f] == [[s.token_ids for s in r] for r in d]


def test_greedy_n_copies(lively, prompts):
    out = lively.generate(prompts[:2], SamplingSpec(max_new_tokens=5, n=3))
    for r in out:
        assert len(r) == 3 and all(s.token_ids == r[0].token_ids for s in r)


def test_drop_keeps_other_rows_unchanged(lively, prompts):
    ref = lively.start(prompts)
    batch = lively.start(prompts)
    rows = batch.active_rows()
    for _ in range(2):
        ref.step()
        batch.step()
    batch.drop([rows[0]])  # the longest prompt: its padding columns go too
    assert batch.active_rows() == rows[1:]
    for _ in range(6):
        ref.step()
        batch.step()
    for r in rows[1:]:
        assert batch.tokens(r) == ref.tokens(r)
        torch.testing.assert_close(torch.tensor(batch.logprobs(r)), torch.tensor(ref.logprobs(r)), atol=1e-5, rtol=0)
    assert batch._mask.shape[1] < ref._mask.shape[1]  # compacted


def test_step_subset_leaves_other_rows_unchanged(lively, prompts):
    ref = lively.start(prompts)
    batch = lively.start(prompts)
    rows = batch.active_rows()
    for _ in range(3):
        ref.step()
    batch.step()
    batch.step(rows=[rows[0], rows[2]])  # row 1 sits out twice
    batch.step(rows=[rows[0], rows[2]])
    batch.step(rows=[rows[1]])
    batch.step(rows=[rows[1]])
    assert [len(batch.tokens(r)) for r in rows] == [3, 3, 3]
    for r in rows:
        assert batch.tokens(r) == ref.tokens(r)


def test_derive_seed_is_stable_and_ordered():
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(1, None) == derive_seed(1, 0) != derive_seed(1)
    assert all(0 <= derive_seed(-5, "q", j) < 2**63 for j in range(100))
    assert derive_seed(7, "q1") == 125763913418814822  # pinned: a resumed run must draw what the first did


def test_encode_chat(tiny_engine, tokenizer):
    ids = tiny_engine.encode_chat("What is 2 + 3?", system="Be brief.")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.") and text.endswith("<|im_start|>assistant\n")
    assert tiny_engine.encode_messages([{"role": "user", "content": "hi"}]) == tiny_engine.encode_chat("hi")


def test_sampler_follows_temperature_and_top_p():
    from esm_steer.engine.hf import _sample

    logits = torch.log(torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([_sample(logits, 1.0, 1.0, [gen]) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=5).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05]), atol=0.03, rtol=0)
    # top_p = 0.7: the nucleus is {0.5, 0.3}, renormalised
    draws = torch.cat([_sample(logits, 1.0, 0.7, [gen]) for _ in range(4000)])
    freq = torch.bincount(draws, minlength=5).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.625, 0.0, 0.375, 0.0]), atol=0.03, rtol=0)


def test_prompt_logprobs_short_sequences(tiny_engine):
    out = tiny_engine.prompt_logprobs([[5], [5, 6, 7], []])
    assert out[0] == [] and out[2] == [] and len(out[1]) == 2
    hs = tiny_engine.hidden_states([[5], [5, 6, 7]])
    assert [h.shape[0] for h in hs] == [1, 3]
