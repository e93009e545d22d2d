"""``attnmem.checks``: the positive-int and count checks behind every option and argument that takes one."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from attnmem.checks import check_count, check_positive_fields, check_positive_int
from attnmem.mechanisms.exact import ChunkedOptions
from attnmem.tasks.mqar import MQAR


@pytest.mark.parametrize("val", [1, 7, 2**40])
def test_positive_ints_pass(val):
    check_positive_int("chunk", val)


@pytest.mark.parametrize("val", [0, -3, True, False, 1.0, "4", None])
def test_anything_else_is_refused_naming_the_argument_and_the_value(val):
    with pytest.raises(ValueError, match=rf"^chunk must be a positive int, got {val!r}$"):
        check_positive_int("chunk", val)


def test_none_passes_only_when_allowed_and_the_message_says_so():
    check_positive_int("max_len", None, allow_none=True)
    with pytest.raises(ValueError, match=r"^max_len must be a positive int or None, got 0$"):
        check_positive_int("max_len", 0, allow_none=True)


def test_where_prefixes_the_message():
    with pytest.raises(ValueError, match=r"^mqar: seq_len must be a positive int, got -1$"):
        check_positive_int("seq_len", -1, where="mqar")


def test_fields_are_checked_in_order_and_the_first_bad_one_is_named():
    @dataclass
    class Opts:
        a: object = 1
        b: object = 0
        c: object = -1

    check_positive_fields(Opts(b=2, c=3), ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"^b must be a positive int, got 0$"):
        check_positive_fields(Opts(), ("a", "b", "c"))


def test_the_callers_keep_their_messages():
    """An options dataclass and a task generator, both moved onto the shared check."""
    with pytest.raises(ValueError, match=r"^kv_tile must be a positive int, got 0$"):
        ChunkedOptions(kv_tile=0)
    with pytest.raises(ValueError, match=r"^mqar: num_pairs must be a positive int, got True$"):
        MQAR(num_pairs=True)


@pytest.mark.parametrize("val,minimum", [(0, 0), (5, 0), (1, 1), (2**40, 3)])
def test_counts_at_or_above_the_minimum_pass_and_come_back(val, minimum):
    assert check_count("bigbird", "random_blocks", val, minimum) == val


@pytest.mark.parametrize("val,minimum,kind", [(-1, 0, "non-negative"), (0, 1, ">= 1"), (True, 0, "non-negative"),
                                              (2.0, 0, "non-negative"), ("3", 1, ">= 1")])
def test_a_bad_count_is_refused_naming_the_method_the_argument_and_the_bound(val, minimum, kind):
    with pytest.raises(ValueError, match=rf"^bigbird: block must be an int {kind}, got {val!r}$"):
        check_count("bigbird", "block", val, minimum)
