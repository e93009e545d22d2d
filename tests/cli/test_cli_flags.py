"""One parser for sizes and one grammar for method options, in every flag that takes them."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

import attnmem
from attnmem.cli import common, main
from attnmem.cli import compare as compare_mod
from attnmem.cli import plan as plan_mod
from attnmem.cli import train as train_mod
from attnmem.memory.plan import parse_budget
from attnmem.memory.units import parse_bytes
from attnmem.method_spec import parse_method_list, parse_method_spec

# Each spelling and the bytes it means (the units documented in attnmem.memory.units).
SIZES = [("1e9", 10**9), ("24G", 24 * 2**30), ("24GiB", 24 * 2**30), ("24 gib", 24 * 2**30),
         ("512MiB", 512 * 2**20), ("512M", 512 * 2**20), ("2TB", 2 * 10**12), ("80GB", 80 * 10**9),
         ("1.5TiB", int(1.5 * 2**40)), ("4096", 4096)]
BAD_SIZES = ["lots", "-1GB", "0", "0.5", "12 parsecs", "", "inf", "nan", "1e30", "24GiBs"]


def _size_flags() -> list[tuple[str, str]]:
    """(command, flag) for every flag of every command whose callback is the size parser."""
    return [(name, max(p.opts, key=len)) for name, cmd in main.commands.items() for p in cmd.params
            if getattr(p, "callback", None) is common.size]


def test_every_size_flag_uses_the_one_parser():
    # The flags that take a size today; a new one must use common.size to be listed here.
    assert sorted(_size_flags()) == [("compare", "--budget"), ("plan", "--budget"), ("train", "--max-batch-under")]


@pytest.mark.parametrize("text, expected", SIZES)
def test_size_spellings_mean_the_same_in_the_api(text, expected):
    assert parse_bytes(text, "x") == expected
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", BAD_SIZES)
def test_bad_sizes_are_refused_naming_the_argument(text):
    with pytest.raises(ValueError, match="budget must be"):
        parse_budget(text)
    with pytest.raises(ValueError, match="--max-batch-under"):
        parse_bytes(text, "--max-batch-under")


@pytest.fixture
def captured(monkeypatch):
    """Stops each command right after its flags are parsed, keeping what it was given."""
    seen: dict = {}

    class Stop(Exception):
        pass

    def sweep(cfg, path, **kw):
        seen.update(budget=cfg.budget_bytes, options=cfg.options, methods=cfg.methods)
        raise Stop

    def plan_specs(cfg, limit, specs, on_method):
        seen.update(budget=limit, specs=specs)
        raise Stop

    def max_batch(limit, peak_fn):
        seen.update(budget=limit)
        raise Stop

    monkeypatch.setattr(compare_mod, "run_sweep", sweep)
    monkeypatch.setattr(plan_mod, "plan_specs", plan_specs)
    monkeypatch.setattr(train_mod.training, "max_batch_under", max_batch)
    return seen


def _invoke(args: list[str], tmp_path):
    return CliRunner().invoke(main, args, catch_exceptions=True)


COMMANDS = {
    ("compare", "--budget"): ["compare", "--methods", "chunked", "--seq-lens", "64", "--no-plots", "--overwrite",
                              "--out"],
    ("plan", "--budget"): ["plan", "--config", "tiny", "--methods", "chunked"],
    ("train", "--max-batch-under"): ["train", "--seq-len", "64", "--out"],
}


@pytest.mark.parametrize("flag", sorted(COMMANDS))
@pytest.mark.parametrize("text, expected", SIZES)
def test_size_spellings_mean_the_same_in_every_flag(captured, tmp_path, flag, text, expected):
    args = list(COMMANDS[flag])
    if args[-1] == "--out":
        args.append(str(tmp_path / "out"))
    r = _invoke([*args, flag[1], text], tmp_path)
    assert "budget" in captured, r.output
    assert captured["budget"] == expected


@pytest.mark.parametrize("flag", sorted(COMMANDS))
@pytest.mark.parametrize("text", ["lots", "0", "1e30", "2 parsecs"])
def test_bad_size_in_every_flag_is_one_line_naming_it(captured, tmp_path, flag, text):
    args = list(COMMANDS[flag])
    if args[-1] == "--out":
        args.append(str(tmp_path / "out"))
    r = _invoke([*args, flag[1], text], tmp_path)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag[1] in lines[0], r.output


def test_method_spec_grammar():
    assert parse_method_spec("chunked:q_tile=64,kernel=torch") == ("chunked", {"q_tile": 64, "kernel": "torch"})
    assert parse_method_spec("longformer:window=8,global_tokens=[0,1]") == (
        "longformer", {"window": 8, "global_tokens": [0, 1]})
    assert parse_method_spec("sliding_window:window=(None, 0)") == ("sliding_window", {"window": (None, 0)})
    assert parse_method_list("chunked,sdpa") == [("chunked", {}), ("sdpa", {})]
    assert parse_method_list("chunked:q_tile=64,kernel=torch;linear") == [
        ("chunked", {"q_tile": 64, "kernel": "torch"}), ("linear", {})]
    assert parse_method_list("chunked:q_tile=64,sdpa") == [("chunked", {"q_tile": 64}), ("sdpa", {})]
    assert parse_method_list("chunked;chunked:mask_window=8", distinct="spec") == [
        ("chunked", {}), ("chunked", {"mask_window": 8})]
    for bad, word in (("chunked,chunked", "more than once"), ("", "one or more"), ("=3", "name"),
                      ("chunked:q_tile", "key=value")):
        with pytest.raises(ValueError, match=word):
            parse_method_list(bad)


def test_method_options_reach_every_command(captured, tmp_path):
    r = _invoke(["compare", "--methods", "chunked:q_tile=32,kv_tile=16;reference", "--seq-lens", "64",
                 "--overwrite", "--out", str(tmp_path / "c")], tmp_path)
    assert captured["options"] == {"chunked": {"q_tile": 32, "kv_tile": 16}}, r.output
    assert captured["methods"] == ["chunked", "reference"]
    r = _invoke(["plan", "--config", "tiny", "--budget", "1GB", "--methods", "chunked:q_tile=32,sdpa"], tmp_path)
    assert captured["specs"] == [("chunked", {"q_tile": 32}), ("sdpa", {})], r.output


def test_estimate_takes_the_spec_and_the_older_option_flag():
    import json

    a = CliRunner().invoke(main, ["estimate", "chunked:q_tile=128", "--seq-len", "512", "--json", "--how", "formula"])
    b = CliRunner().invoke(main, ["estimate", "chunked", "--option", "q_tile=128", "--seq-len", "512", "--json",
                                  "--how", "formula"])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert json.loads(a.output)["options"] == json.loads(b.output)["options"] == {"q_tile": 128}
    assert json.loads(a.output)["peak_bytes"] == json.loads(b.output)["peak_bytes"]


@pytest.mark.parametrize("command", [
    ["compare", "--methods", "chunked,chunked", "--seq-lens", "64"],
    ["plan", "--config", "tiny", "--budget", "1GB", "--methods", "chunked,chunked"],
    ["train", "--sweep", "--methods", "chunked;chunked"],
])
def test_a_method_listed_twice_is_refused(command):
    r = CliRunner().invoke(main, command)
    assert r.exit_code == 2 and "more than once" in r.output, r.output


def test_unknown_option_in_a_spec_is_refused_before_running(tmp_path):
    r = CliRunner().invoke(main, ["compare", "--methods", "chunked:nope=1", "--seq-lens", "64",
                                  "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "nope" in r.output and not (tmp_path / "c").exists(), r.output


def test_no_command_imports_the_group():
    """Subcommand modules import ``cli.common`` only (no import circle through ``cli``)."""
    import ast
    import inspect

    for mod in (compare_mod, plan_mod, train_mod):
        tree = ast.parse(inspect.getsource(mod))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert node.module in (None, "common"), (mod.__name__, node.module)
    assert isinstance(main, click.Group) and attnmem.cli.main is main
