"""Stage I (mine), the driver: a resumable run on a fake engine, refusals, a tiny real model (math: test_candidates)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from esm_steer.config import ESMConfig
from esm_steer.engine.base import EngineInfo, Sample
from esm_steer.esm.artifacts import load_candidates
from esm_steer.esm.mine import mine
from esm_steer.io import read_jsonl
from esm_steer.runs import RunError
from modes import with_seed_mode

# ---------------------------------------------------------------- a controllable engine

RESPONSES = [
    "We add 2 and 3.\n\nThat gives 5.\n\nThe answer is 5.",
    "Add them.\n\nThe answer is 5.",
    "We add 2 and 3.\n\nThat gives 6.\n\nThe answer is 6.",
    "Hmm.\n\nMaybe 4.\n\nOr 7.\n\nThe answer is 7.",
    "The answer is 5.",
]


def is_correct(text: str, gold: str) -> bool:
    return text.strip().endswith(f"answer is {gold}.")


def pred(text: str) -> str:
    return text.strip().rstrip(".").split()[-1]


class KilledError(RuntimeError):
    pass


class FakeEngine:
    """Rollouts drawn from RESPONSES by (prompt seed, sample index); hidden states are a fixed
    function of the token ids, so reruns and resumes see the same numbers."""

    def __init__(self, tokenizer, d: int = 8, fail_on_call: int | None = None, model_id: str = "fake-model"):
        self.tokenizer = tokenizer
        self.info = EngineInfo(model_id, 2, d, 1, "float32", "fake")
        self.fail_on_call = fail_on_call
        self.generate_calls = 0
        self.hidden_calls = 0
        self.freq = torch.linspace(0.01, 0.3, d, dtype=torch.float64)

    def hidden_states_source(self) -> str:
        return "fake"

    def generate(self, prompts, spec, prompt_seeds=None):
        self.generate_calls += 1
        if self.fail_on_call is not None and self.generate_calls == self.fail_on_call:
            raise KilledError("killed")
        out = []
        for i, p in enumerate(prompts):
            seed = prompt_seeds[i] if prompt_seeds is not None else (spec.seed, i)
            row = []
            for j in range(spec.n):
                text = random.Random(f"{seed}-{j}").choice(RESPONSES)
                ids = self.tokenizer.encode(text, add_special_tokens=False)[: spec.max_new_tokens]
                row.append(Sample(ids, self.tokenizer.decode(ids), [0.0] * len(ids), "stop", len(p)))
            out.append(row)
        return out

    def hidden_states(self, sequences, layer=None):
        self.hidden_calls += 1
        out = []
        for seq in sequences:
            t = torch.tensor(seq, dtype=torch.float64)
            pos = torch.arange(len(seq), dtype=torch.float64)
            out.append(torch.sin(t[:, None] * self.freq[None] + 0.1 * pos[:, None]).float())
        return out

    def close(self):
        pass


def make_cfg(**over):
    cfg = with_seed_mode(OmegaConf.structured(ESMConfig))  # rollout positives, length_penalty 0.1
    base = {
        "offline_mine.K": 6,
        "offline_mine.K_pos": 3,
        "offline_mine.K_neg": 3,
        "offline_mine.max_new_tokens": 32,
        "offline_mine.keep_top_C": 100,
        "control_points.M": 3,
        "model.batch_size": 12,  # 2 questions per generate call
    }
    base.update(over)
    for k, v in base.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def make_examples(n: int, solution: str | None = "2 plus 3.\n\nThe answer is 5."):
    return [
        SimpleNamespace(id=f"q{i:02d}", question=f"What is 2 + 3? ({i})", gold="5", solution=solution) for i in range(n)
    ]


def run_mine(tmp_path, tokenizer, engine=None, examples=None, **over):
    cfg = make_cfg(**over)
    examples = examples or make_examples(8)
    engine = engine or FakeEngine(tokenizer)
    prompts = [tokenizer.encode(ex.question, add_special_tokens=False) for ex in examples]
    return mine(cfg, tmp_path, engine, examples, prompts, is_correct, pred), engine


# ---------------------------------------------------------------- the stage on a fake engine


def test_mine_writes_every_artifact(tmp_path, tokenizer):
    summary, engine = run_mine(tmp_path, tokenizer)
    d = tmp_path / "mine"
    rollouts = read_jsonl(d / "rollouts.jsonl")
    assert len(rollouts) == 8 * 6
    r = rollouts[0]
    assert set(r) >= {
        "question_id",
        "sample_id",
        "text",
        "tokens",
        "token_ids",
        "finish_reason",
        "correct",
        "reward",
        "pred",
    }
    assert r["tokens"] == len(r["token_ids"])
    assert r["reward"] == pytest.approx(float(r["correct"]) - 0.1 * r["tokens"] / 32)
    cands = read_jsonl(d / "candidates.jsonl")
    assert cands and len(cands) == summary["candidates_kept"]
    assert set(cands[0]) >= {"id", "question_id", "m", "Q", "n_pos", "n_neg", "v_norm", "n_states"}
    assert [c["Q"] for c in cands] == sorted((c["Q"] for c in cands), reverse=True)
    for c in cands:
        v = torch.load(d / "vectors" / f"{c['id']}.pt")
        k = torch.load(d / "keys" / f"{c['id']}.pt")
        assert v.shape == (8,) and k["key"].shape == (8,) and k["states"].shape == (c["n_states"], 8)
        assert float(v.norm()) == pytest.approx(c["v_norm"], rel=1e-5)
        assert torch.allclose(k["states"].mean(0), k["key"], atol=1e-6)
        assert c["n_states"] == c["n_pos"] + c["n_neg"]
    s = json.loads((d / "summary.json").read_text())
    assert s["questions"] == 8 and sum(s["candidates_per_m"].values()) == len(cands)
    assert s["questions_with_candidates"] + sum(s["skipped"].values()) == 8
    assert engine.hidden_calls == s["questions_with_candidates"] + s["skipped"].get(
        "no control point reached by both sets", 0
    )  # one batched pass per question with both sets
    loaded, meta = load_candidates(tmp_path)
    assert [c.id for c in loaded] == [c["id"] for c in cands] and meta["model_id"] == "fake-model"


def test_mine_keep_top_C_and_pos_source_gold(tmp_path, tokenizer):
    summary, _ = run_mine(tmp_path / "a", tokenizer, **{"offline_mine.keep_top_C": 3})
    assert summary["candidates_kept"] == 3 and summary["candidates_total"] > 3
    summary, _ = run_mine(tmp_path / "b", tokenizer, **{"offline_mine.pos_source": "gold"})
    cands = read_jsonl(tmp_path / "b" / "mine" / "candidates.jsonl")
    assert cands and all(c["n_pos"] == 1 for c in cands)
    # the gold positive is never written as a rollout
    assert all(r["sample_id"] >= 0 for r in read_jsonl(tmp_path / "b" / "mine" / "rollouts.jsonl"))


def test_mine_skips_questions_without_both_sets(tmp_path, tokenizer):
    examples = make_examples(6)
    examples[0].gold = "123"  # nothing is ever right
    summary, _ = run_mine(tmp_path, tokenizer, examples=examples)
    assert summary["skipped"].get("no correct rollout", 0) >= 1
    assert "q00" not in {c["question_id"] for c in read_jsonl(tmp_path / "mine" / "candidates.jsonl")}


def test_killed_mine_resumes_to_the_same_candidates(tmp_path, tokenizer):
    full, _ = run_mine(tmp_path / "full", tokenizer)
    with pytest.raises(KilledError):
        run_mine(tmp_path / "cut", tokenizer, engine=FakeEngine(tokenizer, fail_on_call=3))
    partial = read_jsonl(tmp_path / "cut" / "mine" / "rollouts.jsonl")
    assert len(partial) == 2 * 2 * 6  # two calls of two questions
    resumed_engine = FakeEngine(tokenizer)
    resumed, _ = run_mine(tmp_path / "cut", tokenizer, engine=resumed_engine)
    assert resumed_engine.generate_calls == 2  # only the 4 questions left
    a = read_jsonl(tmp_path / "full" / "mine" / "rollouts.jsonl")
    b = read_jsonl(tmp_path / "cut" / "mine" / "rollouts.jsonl")
    keys = [(r["question_id"], r["sample_id"]) for r in b]
    assert len(keys) == len(set(keys)) == 8 * 6  # no duplicated rollouts
    assert a == b
    ca = read_jsonl(tmp_path / "full" / "mine" / "candidates.jsonl")
    cb = read_jsonl(tmp_path / "cut" / "mine" / "candidates.jsonl")
    assert ca == cb
    for c in ca:
        va = torch.load(tmp_path / "full" / "mine" / "vectors" / f"{c['id']}.pt")
        vb = torch.load(tmp_path / "cut" / "mine" / "vectors" / f"{c['id']}.pt")
        assert torch.equal(va, vb)
    assert {k: v for k, v in full.items() if "wall" not in k and "per_s" not in k and k != "rollouts_generated"} == {
        k: v for k, v in resumed.items() if "wall" not in k and "per_s" not in k and k != "rollouts_generated"
    }


def test_rerun_completes_a_question_cut_mid_write(tmp_path, tokenizer):
    run_mine(tmp_path / "full", tokenizer)
    path = tmp_path / "full" / "mine" / "rollouts.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut" / "mine"
    cut.mkdir(parents=True)
    # 1.5 questions on disk and half a line: a kill inside one question's write
    (cut / "rollouts.jsonl").write_text("".join(lines[:9]) + lines[9][:20])
    run_mine(tmp_path / "cut", tokenizer)
    order = lambda rs: sorted(rs, key=lambda r: (r["question_id"], r["sample_id"]))  # noqa: E731
    assert order(read_jsonl(cut / "rollouts.jsonl")) == order(read_jsonl(path))
    assert read_jsonl(cut / "candidates.jsonl") == read_jsonl(tmp_path / "full" / "mine" / "candidates.jsonl")


def test_mine_refuses_rollouts_of_another_model(tmp_path, tokenizer):
    run_mine(tmp_path, tokenizer, examples=make_examples(2))
    with pytest.raises(RunError, match="fake-model.*other-model"):
        run_mine(tmp_path, tokenizer, engine=FakeEngine(tokenizer, model_id="other-model"))


# ---------------------------------------------------------------- a real (tiny) model


def test_mine_with_tiny_hf_model(tmp_path, tokenizer, tiny_model):
    engine_mod = pytest.importorskip("esm_steer.engine.hf")
    engine = engine_mod.HFEngine(tiny_model, tokenizer, steer_layer=1, batch_size=8)
    examples = make_examples(3)
    calls = iter(range(10_000))
    flip = lambda text, gold: next(calls) % 2 == 0  # noqa: E731 - half right, half wrong
    cfg = make_cfg(
        **{
            "offline_mine.K": 4,
            "offline_mine.max_new_tokens": 12,
            "control_points.M": 2,
            "control_points.segment_delimiter": " ",
        }
    )
    prompts = [tokenizer.encode(ex.question, add_special_tokens=False) for ex in examples]
    summary = mine(cfg, tmp_path, engine, examples, prompts, flip, pred)
    assert summary["rollouts"] == 12
    cands = read_jsonl(tmp_path / "mine" / "candidates.jsonl")
    assert cands, summary
    v = torch.load(tmp_path / "mine" / "vectors" / f"{cands[0]['id']}.pt")
    assert v.shape == (tiny_model.config.hidden_size,) and torch.isfinite(v).all()


def test_mine_refuses_rollouts_of_another_sampling_config(tmp_path, tokenizer):
    run_mine(tmp_path, tokenizer, examples=make_examples(2))
    with pytest.raises(RunError, match=r"rollouts.jsonl holds rollouts made .*offline_mine.max_new_tokens: 32 -> 16"):
        run_mine(tmp_path, tokenizer, examples=make_examples(2), **{"offline_mine.max_new_tokens": 16})
    # the reward is recomputed with this run's length_penalty; the delimiter and M may change too
    before = read_jsonl(tmp_path / "mine" / "candidates.jsonl")
    run_mine(tmp_path, tokenizer, examples=make_examples(2), **{"offline_mine.length_penalty": 0.5})
    after = read_jsonl(tmp_path / "mine" / "candidates.jsonl")
    assert [c["Q"] for c in before] != [c["Q"] for c in after]


def test_resume_accepts_a_meta_of_an_older_run_and_another_layer(tmp_path, tokenizer):
    """The layer is recorded, not compared (candidates are recomputed); a sampling key that an
    older run did not record does not refuse its rollouts."""
    run_mine(tmp_path, tokenizer, examples=make_examples(2))
    meta_path = tmp_path / "mine" / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["steer_layer"] == 1 and meta["sampling"]["offline_mine.max_new_tokens"] == 32
    del meta["sampling"]["decode.top_p"]
    meta_path.write_text(json.dumps(meta))
    engine = FakeEngine(tokenizer)
    engine.info = EngineInfo("fake-model", 2, 8, 0, "float32", "fake")
    run_mine(tmp_path, tokenizer, engine=engine, examples=make_examples(2), **{"decode.top_p": 0.5})
    meta = json.loads(meta_path.read_text())
    assert meta["steer_layer"] == 0 and meta["sampling"]["decode.top_p"] == 0.5
    assert engine.generate_calls == 0  # every rollout was on disk


def test_rerun_with_smaller_K_uses_the_first_K_rollouts(tmp_path, tokenizer):
    run_mine(tmp_path / "a", tokenizer, examples=make_examples(3))
    summary, engine = run_mine(tmp_path / "a", tokenizer, examples=make_examples(3), **{"offline_mine.K": 4})
    assert engine.generate_calls == 0 and summary["rollouts"] == 3 * 4
    fresh, _ = run_mine(tmp_path / "b", tokenizer, examples=make_examples(3), **{"offline_mine.K": 4})
    assert read_jsonl(tmp_path / "a" / "mine" / "candidates.jsonl") == read_jsonl(
        tmp_path / "b" / "mine" / "candidates.jsonl"
    )


class TruncatingEngine(FakeEngine):
    """Marks a rollout cut at max_new_tokens as finish_reason=length, as the real engines do."""

    def generate(self, prompts, spec, prompt_seeds=None):
        out = super().generate(prompts, spec, prompt_seeds)
        return [
            [
                s
                if len(s.token_ids) < spec.max_new_tokens
                else Sample(s.token_ids, s.text, s.logprobs, "length", s.num_prompt_tokens)
                for s in row
            ]
            for row in out
        ]


def test_high_truncation_warns_naming_the_budget_key(tmp_path, tokenizer, caplog):
    with caplog.at_level("WARNING", logger="esm_steer.esm.mine"):
        summary, _ = run_mine(
            tmp_path / "cut", tokenizer, engine=TruncatingEngine(tokenizer), **{"offline_mine.max_new_tokens": 4}
        )
    assert summary["finish_reasons"] == {"length": summary["rollouts"]}
    warns = [r.getMessage() for r in caplog.records if "offline_mine.max_new_tokens" in r.getMessage()]
    assert len(warns) == 1 and "100% of 48 rollouts" in warns[0] and "=4 " in warns[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="esm_steer.esm.mine"):
        run_mine(tmp_path / "ok", tokenizer, engine=TruncatingEngine(tokenizer), **{"offline_mine.max_new_tokens": 64})
    assert not [r for r in caplog.records if "offline_mine.max_new_tokens" in r.getMessage()]
