"""The training loop: it learns, resumes exactly, writes checkpoints atomically, finds batches."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import attnmem.training as T
from attnmem.method_spec import parse_method_spec
from attnmem.tasks import MQAR
from attnmem.training import TrainConfig, fit, max_batch_under
from attnmem.training.loop import ADDED_FIELDS

TINY = dict(task="mqar", task_options={"num_pairs": 2, "vocab_size": 16}, seq_len=32, d_model=32, n_heads=2,
            n_layers=1, batch_size=16, eval_examples=32, warmup_steps=2)
TIMING = ("tokens_per_s", "train_time_s", "wall_s")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine run an order of magnitude faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def without_timing(row):
    return {k: v for k, v in row.items() if k not in TIMING}


def test_tiny_run_lowers_the_loss():
    cfg = TrainConfig(**TINY, steps=40, eval_every=40, lr=1e-2)
    task, model, _, _ = T.build(cfg)
    eval_set = task.sample(cfg.eval_examples, torch.Generator().manual_seed(cfg.seed + T.EVAL_SEED_OFFSET))
    before = T.evaluate(model, *eval_set, cfg.batch_size)["eval_loss"]  # the same initial model
    result = fit(cfg)
    after = result.metrics["eval_loss"]
    assert after < before - 0.3, (before, after)
    assert result.metrics["peak_mib"] > 0 and result.metrics["tokens_per_s"] > 0


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    common = dict(**TINY, steps=8, eval_every=2, checkpoint_every=3, seed=3)
    full = fit(TrainConfig(**common, out_dir=str(tmp_path / "full")))
    cut = TrainConfig(**common, out_dir=str(tmp_path / "cut"))
    half = fit(cut, stop_at=5)  # "interrupted" after step 5, between two periodic checkpoints
    assert half.metrics["steps"] == 5
    mid_weights = {k: v.clone() for k, v in half.model.state_dict().items()}
    resumed = fit(cut, resume=True)
    assert resumed.metrics["steps"] == 8
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert any(not torch.equal(v, mid_weights[k]) for k, v in full.model.state_dict().items())  # it trained on
    assert [without_timing(h) for h in full.history] == [without_timing(h) for h in resumed.history]
    lines = [json.loads(s) for s in (tmp_path / "cut" / T.METRICS).read_text().splitlines()]
    assert [without_timing(h) for h in lines] == [without_timing(h) for h in full.history]
    assert [h["step"] for h in lines] == [2, 4, 6, 8]


def test_resume_refuses_a_different_config(tmp_path):
    fit(TrainConfig(**TINY, steps=2, eval_every=2, out_dir=str(tmp_path)))
    other = TrainConfig(**{**TINY, "lr": 1e-2}, steps=4, eval_every=2, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="differs in: lr"):
        fit(other, resume=True)
    with pytest.raises(ValueError, match="out_dir"):
        fit(TrainConfig(**TINY, steps=2), resume=True)


def test_resume_reads_a_checkpoint_from_before_window_warmup(tmp_path):
    cfg = TrainConfig(**TINY, steps=2, eval_every=2, checkpoint_every=1, out_dir=str(tmp_path))
    fit(cfg, stop_at=1)
    path = tmp_path / T.CHECKPOINT
    state = T.load_checkpoint(path)
    for key in ADDED_FIELDS:  # as an older attnmem wrote it
        del state["config"][key]
    T.save_atomic(state, path)
    assert fit(cfg, resume=True).metrics["steps"] == 2
    with pytest.raises(ValueError, match="window_warmup"):  # a warm-up the old run did not have is refused
        fit(dataclasses.replace(cfg, window_warmup=1), resume=True)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    T.save_atomic({"step": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        T.save_atomic({"step": 2}, path)
    assert T.load_checkpoint(path)["step"] == 1  # the old checkpoint survives a crash mid-write


def test_listops_classification_and_window_mask(tmp_path):
    cfg = TrainConfig(task="listops", task_options={"min_length": 8, "max_depth": 3, "max_args": 3}, seq_len=48,
                      d_model=32, n_heads=2, n_layers=1, batch_size=8, eval_examples=16, steps=2, eval_every=2,
                      method_options={"mask_window": 8})
    task, model, _, _ = T.build(cfg)
    x, _ = task.sample(4, torch.Generator().manual_seed(0))
    assert model(x).shape == (4, 10)
    # The readout is the last non-pad token, so changing what follows it changes nothing.
    padded = x.clone()
    padded[:, -1] = 0
    assert torch.allclose(model(x), model(padded)) or bool((x[:, -1] != 0).any())
    r = fit(cfg)
    assert 0.0 <= r.metrics["eval_accuracy"] <= 1.0 and r.metrics["method"] == "chunked:mask_window=8"


def test_bad_train_options():
    with pytest.raises(ValueError, match="unknown task"):
        TrainConfig(task="nope")
    with pytest.raises(ValueError, match="nope"):
        TrainConfig(method="nope")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="mask_window"):
        TrainConfig(method_options={"mask_window": 0})
    with pytest.raises(ValueError, match="num_pairs"):
        TrainConfig(task_options={"num_pairs": 100}, seq_len=64)
    assert parse_method_spec("chunked:q_tile=64,kernel=torch") == ("chunked", {"q_tile": 64, "kernel": "torch"})
    with pytest.raises(ValueError, match="key=value"):
        parse_method_spec("chunked:q_tile")


def test_max_batch_under_with_a_fake_peak():
    calls = []

    def peak(b):  # 100 bytes fixed + 7 per sample: the answer is floor((budget - 100) / 7)
        calls.append(b)
        return 100 + 7 * b

    assert max_batch_under(100 + 7 * 1000, peak) == 1000
    assert len(calls) < 2 * 11 + 2  # doubling to 1024 then bisection: logarithmic
    assert max_batch_under(100 + 7 * 1000 + 6, peak) == 1000
    assert max_batch_under(107, peak) == 1
    assert max_batch_under(10**9, peak, limit=50) == 50
    with pytest.raises(ValueError, match="batch of 1"):
        max_batch_under(106, peak)
    with pytest.raises(ValueError, match="budget"):
        max_batch_under(0, peak)


def test_linear_peak_fn_matches_a_measured_step():
    cfg = TrainConfig(**TINY)
    fn = T.linear_peak_fn(cfg, (4, 8))
    task, model, opt, _ = T.build(cfg)
    measured = T.step_peak(model, opt, *task.sample(16, torch.Generator().manual_seed(0)))[0]
    assert abs(fn(16) - measured) / measured < 0.1  # extrapolated from 4 and 8 to 16, within 10 %


# Vocabulary 256 and 8 pairs at N = 64: activations, not the update, set the peak from small batches on.
PLANNED = dict(task="mqar", task_options={"num_pairs": 8, "vocab_size": 256}, seq_len=64, d_model=32, n_heads=2,
               n_layers=2, batch_size=8)


def test_estimated_batch_fits_the_budget_and_one_more_does_not():
    cfg = TrainConfig(**PLANNED)
    peak = T.estimated_peak_fn(cfg)
    budget = peak(37) + (peak(38) - peak(37)) // 2  # between the predictions for 37 and 38 sequences
    chosen = max_batch_under(budget, peak)
    assert chosen == 37 and peak(chosen) <= budget < peak(chosen + 1)
    plan_cfg = T.plan_config(cfg, chosen)  # the task's shape reaches the plan: 8 labelled rows, 256 outputs
    assert (plan_cfg.head_rows, plan_cfg.num_outputs, plan_cfg.vocab, plan_cfg.batch) == (8, 256, 256, 37)


@pytest.mark.parametrize("extra", [{}, {"checkpointing": True},
                                   {"method": "chunked", "method_options": {"mask_window": 8}},
                                   {"task": "listops", "task_options": {"min_length": 16}}])
def test_estimated_peak_matches_a_measured_step(extra):
    cfg = TrainConfig(**{**PLANNED, **extra})
    task, model, opt, _ = T.build(cfg)
    measured = T.step_peak(model, opt, *task.sample(cfg.batch_size, torch.Generator().manual_seed(0)))[0]
    predicted = T.estimated_peak_fn(cfg)(cfg.batch_size)
    assert abs(predicted - measured) / measured < 0.1, (predicted, measured)  # attnmem.plan vs attnmem.measure


def test_step_peak_counts_the_adamw_moments():
    cfg = TrainConfig(**PLANNED)
    task, model, opt, _ = T.build(cfg)
    batch = task.sample(1, torch.Generator().manual_seed(0))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert T.step_peak(model, opt, *batch)[0] >= 4 * params  # weights, gradients, two moments
    assert not opt.state  # measured on copies: the run's optimizer is untouched


def test_target_accuracy_stops_early_and_records_when(tmp_path):
    cfg = TrainConfig(**TINY, steps=40, eval_every=5, lr=1e-2, target_accuracy=0.2, out_dir=str(tmp_path))
    result = fit(cfg)
    m = result.metrics
    first = next(h for h in result.history if h["eval_accuracy"] >= 0.2)  # recomputed from the history
    assert m["target_step"] == first["step"] == m["steps"] < 40
    assert m["target_wall_s"] == first["wall_s"] > 0 and m["target_train_time_s"] == first["train_time_s"]
    assert all(h["eval_accuracy"] < 0.2 for h in result.history[:-1])
    again = fit(cfg, resume=True)  # already there: nothing more to train
    assert again.metrics["steps"] == m["steps"] and again.metrics["target_step"] == m["target_step"]


def test_max_time_stops_after_the_step_past_it():
    result = fit(TrainConfig(**TINY, steps=10_000, eval_every=10_000, max_time_s=0.5))
    assert result.metrics["steps"] < 10_000 and result.history[-1]["step"] == result.metrics["steps"]
    assert result.metrics["wall_s"] >= 0.5


def test_train_mix_draws_from_every_source_and_evaluates_on_the_task(monkeypatch):
    cfg = TrainConfig(**{**TINY, "batch_size": 4}, train_mix=[{"seq_len": 16, "num_pairs": 1}])
    (task, b0), (small, b1) = cfg.training_sources()
    assert (task.seq_len, b0) == (32, 4) and (small.seq_len, small.num_pairs, b1) == (16, 1, 8)  # same tokens
    seen = set()
    original = MQAR.sample

    def spy(self, n, generator):
        seen.add((self.seq_len, n))
        return original(self, n, generator)

    monkeypatch.setattr(MQAR, "sample", spy)
    fit(dataclasses.replace(cfg, steps=12, eval_every=12))
    assert {(16, 8), (32, 4)} <= seen  # both sources trained; (32, eval_examples) is the held-out split
    with pytest.raises(ValueError, match="vocabulary"):
        TrainConfig(**TINY, train_mix=[{"vocab_size": 32}])
    with pytest.raises(ValueError, match="num_pairs"):
        TrainConfig(**TINY, train_mix=[{"seq_len": 4}])


def test_sweep_writes_table_and_png(tmp_path):
    cfg = TrainConfig(**TINY, steps=2, eval_every=2, out_dir=str(tmp_path))
    rows = T.sweep(cfg, ["chunked", "chunked:mask_window=4"])
    assert [r["method"] for r in rows] == ["chunked", "chunked:mask_window=4"]
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert len(saved) == 2 and all(0 <= r["eval_accuracy"] <= 1 for r in saved)
    assert "| chunked:mask_window=4 |" in (tmp_path / "sweep.md").read_text()
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="nope"):
        T.sweep(cfg, ["chunked", "nope"])


def test_scored_logits_are_the_full_logits_at_labelled_positions():
    cfg = TrainConfig(**TINY)
    task, model, _, _ = T.build(cfg)
    x, y = task.sample(4, torch.Generator().manual_seed(0))
    logits, targets = model.scored(x, y)
    keep = y != T.IGNORE
    assert torch.allclose(logits, model(x)[keep], atol=1e-6) and torch.equal(targets, y[keep])


def test_tied_readout_is_the_scaled_embedding():
    cfg = TrainConfig(**TINY, tie_embeddings=True)
    task, model, _, _ = T.build(cfg)
    assert model.net.head.weight is None and model.net.head.bias is not None
    x, y = task.sample(4, torch.Generator().manual_seed(0))
    hidden = model.net.hidden(x)  # (B, N, d)
    expected = hidden @ model.net.embed.weight.T / cfg.d_model ** 0.5 + model.net.head.bias  # the definition
    assert torch.allclose(model(x), expected, atol=1e-5)
    logits, _ = model.scored(x, y)
    T.training_loss(logits, y[y != T.IGNORE]).backward()
    assert model.net.embed.weight.grad is not None
    with pytest.raises(ValueError, match="tie_embeddings"):
        TrainConfig(task="listops", seq_len=64, task_options={"min_length": 16}, tie_embeddings=True)


def test_window_warmup_narrows_attention_in_the_first_steps(monkeypatch):
    cfg = TrainConfig(**{**TINY, "seq_len": 32, "window_warmup": 6, "window_start": 4, "steps": 8, "eval_every": 8})
    # Stages of equal length from 4 keys, doubling up to seq_len / 2; the run's own mask after.
    assert [cfg.warmup_window(s) for s in range(8)] == [4, 4, 8, 8, 16, 16, None, None]
    assert dataclasses.replace(cfg, window_start=32).warmup_window(0) is None  # the window covers the sequence
    seen = []
    forward = T.TaskModel.scored

    def record(self, x, y):
        mask = self.attn_mask
        seen.append(None if mask is None else (mask.left, mask.right))
        return forward(self, x, y)

    monkeypatch.setattr(T.TaskModel, "scored", record)
    result = fit(cfg)
    train = [m for m in seen if m is not None]  # the peak step and evaluation see the model's own mask
    assert train == [(3, 0), (3, 0), (7, 0), (7, 0), (15, 0), (15, 0)] and result.model.attn_mask is None
    with pytest.raises(ValueError, match="window_warmup"):
        TrainConfig(**TINY, window_warmup=-1)


def test_context_warmup_trains_on_shorter_windows_with_equal_tokens(monkeypatch):
    cfg = TrainConfig(**{**TINY, "seq_len": 64, "positions": "rotary", "context_warmup": 4, "context_start": 16,
                         "steps": 6, "eval_every": 6})
    # Stages of equal length from 16 tokens, doubling below seq_len; the run's own length after.
    assert [cfg.warmup_context(s) for s in range(6)] == [16, 16, 32, 32, None, None]
    seen = []
    forward = T.TaskModel.scored

    def record(self, x, y):
        seen.append(tuple(x.shape))
        return forward(self, x, y)

    monkeypatch.setattr(T.TaskModel, "scored", record)
    fit(cfg)
    peak, evaluation = [(16, 64)] * 2, [(16, 64)] * 2  # both on the task itself, in batches of batch_size
    # 16 * 64 tokens in every training step: 64 windows of 16, 32 of 32, then the run's own 16 of 64.
    steps = [(64, 16)] * 2 + [(32, 32)] * 2 + [(16, 64)] * 2
    assert seen == peak + steps + evaluation


def test_context_warmup_refuses_what_it_cannot_honour():
    rotary = {**TINY, "positions": "rotary"}
    with pytest.raises(ValueError, match="positions='rotary'"):
        TrainConfig(**TINY, context_warmup=2, context_start=16)
    with pytest.raises(ValueError, match="context_start must be below seq_len"):
        TrainConfig(**rotary, context_warmup=2, context_start=32)
    with pytest.raises(ValueError, match="context_warmup"):
        TrainConfig(**rotary, context_warmup=-1)
    with pytest.raises(ValueError, match="too short for num_pairs"):  # a stage the task cannot sample: at once
        TrainConfig(**{**rotary, "seq_len": 64, "task_options": {"num_pairs": 8, "vocab_size": 32}},
                    context_warmup=2, context_start=16)
    assert ADDED_FIELDS["context_warmup"] == 0  # a checkpoint from before the field resumes as "off"
