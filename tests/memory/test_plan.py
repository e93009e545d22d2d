"""attnmem.plan: whole-model peaks against a real training step, budget searches, configs."""

from __future__ import annotations

import json

import pytest

import attnmem
from attnmem.memory.measure import GiB, MiB
from attnmem.memory.plan import ModelConfig, load_config, measure_step, model_peak, parse_budget, seq_step

SMALL = dict(layers=2, d_model=64, heads=4, vocab=256, seq_len=384, batch=1)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "checkpointed"])
@pytest.mark.parametrize("method, extra", [
    ("sdpa", {}),
    ("chunked", {}),
    ("chunked", dict(d_model=128, kv_heads=2, vocab=1000, seq_len=320)),
    ("reference", dict(d_model=32, heads=2, vocab=50, seq_len=640)),
], ids=["sdpa", "chunked", "chunked-gqa", "reference"])
def test_plan_within_10_percent_of_a_real_training_step(method, extra, checkpointing):
    # The expected value is a real AdamW step of attnmem.nn.Transformer, measured by
    # attnmem.measure with parameters and optimizer moments counted.
    cfg = ModelConfig(**{**SMALL, **extra, "checkpointing": checkpointing})
    predicted = model_peak(cfg, method)["peak"]
    real = measure_step(cfg, method)
    assert abs(predicted - real) <= 0.10 * real, f"predicted {predicted / MiB:.2f} MiB, measured {real / MiB:.2f}"


def test_checkpointing_lowers_the_predicted_peak():
    cfg = ModelConfig(layers=8, d_model=256, heads=4, vocab=1000, seq_len=4096)
    assert model_peak(cfg.replace(checkpointing=True), "chunked")["peak"] < model_peak(cfg, "chunked")["peak"]


@pytest.mark.parametrize("method", ["chunked", "reference"])
def test_max_seq_len_is_monotone_and_exact_to_the_tile(method):
    cfg = ModelConfig(layers=4, d_model=256, heads=4, vocab=1000, seq_len=1024)
    budget = 2 * GiB
    row = next(r for r in attnmem.plan(cfg, budget, methods=[method]))
    n, step = row["max_seq_len"], seq_step(cfg, method)
    assert n % step == 0
    assert model_peak(cfg.replace(seq_len=n), method)["peak"] <= budget
    assert model_peak(cfg.replace(seq_len=n + step), method)["peak"] > budget
    peaks = [model_peak(cfg.replace(seq_len=k * step), method)["peak"] for k in range(1, n // step + 3)]
    assert peaks == sorted(peaks)


def test_max_batch_is_the_largest_that_fits():
    cfg = ModelConfig(layers=4, d_model=256, heads=4, vocab=1000, seq_len=2048)
    row = attnmem.plan(cfg, "1GiB", methods=["chunked"])[0]
    b = row["max_batch"]
    assert b >= 1
    assert model_peak(cfg.replace(batch=b), "chunked")["peak"] <= GiB
    assert model_peak(cfg.replace(batch=b + 1), "chunked")["peak"] > GiB


def test_quadratic_method_reaches_a_shorter_sequence():
    rows = {r["method"]: r for r in attnmem.plan("gpt2-small", "24GiB", methods=["reference", "chunked"])}
    assert rows["reference"]["max_seq_len"] < rows["chunked"]["max_seq_len"]


def test_inference_counts_the_kv_cache():
    cfg = ModelConfig(layers=4, d_model=256, heads=4, kv_heads=1, vocab=1000, seq_len=8192, training=False)
    parts = model_peak(cfg, "chunked")
    assert parts["activations"] == 2 * 4 * 8192 * 64 * 4  # K and V of every layer, one KV head
    assert parts["optimizer"] == 0


@pytest.mark.parametrize("text, expected", [
    ("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("512 MiB", 512 * 2**20), ("1.5TiB", int(1.5 * 2**40)),
    ("1000", 1000), (4096, 4096),
])
def test_budget_units(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", "12 parsecs", ""])
def test_unparseable_budget(text):
    with pytest.raises(ValueError, match="budget must be"):
        parse_budget(text)


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=2, d_model=100, heads=3), "heads=3 does not divide d_model=100"),
    (dict(layers=2, d_model=64, heads=4, kv_heads=3), "kv_heads=3 does not divide heads=4"),
    (dict(layers=-2, d_model=64, heads=4), "layers must be a positive int, got -2"),
    (dict(layers=2, d_model=64, heads=4, seq_len=0), "seq_len must be a positive int"),
    (dict(layers=2, d_model=64, heads=4, dtype="int8"), "dtype must be one of"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_unknown_preset_and_keys():
    with pytest.raises(ValueError, match="unknown preset or missing file 'gpt-17'"):
        load_config("gpt-17")
    with pytest.raises(ValueError, match="unknown config key"):
        load_config({"layers": 2, "d_model": 64, "heads": 4, "wings": 2})


def test_configs_from_yaml_json_and_presets(tmp_path):
    (tmp_path / "m.yaml").write_text("layers: 2\nd_model: 64\nheads: 4\nvocab: 100\ncheckpointing: true\n")
    (tmp_path / "m.json").write_text(json.dumps({"layers": 2, "d_model": 64, "heads": 4, "vocab": 100}))
    y = load_config(str(tmp_path / "m.yaml"), seq_len=128)
    j = load_config(str(tmp_path / "m.json"))
    assert y.checkpointing and y.seq_len == 128 and j.vocab == 100
    p = load_config("llama3-8b", batch=4)
    assert (p.layers, p.d_model, p.heads, p.kv_heads, p.batch) == (32, 4096, 32, 8, 4)
    # Llama 3 8B has 8.0e9; attnmem's GELU MLP (2 matrices of 4·d) is smaller than its
    # SwiGLU (3 matrices of 3.5·d), so the shape-only preset has fewer parameters.
    assert 6.5e9 < p.params() < 8.1e9
