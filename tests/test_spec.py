"""The one grammar for layers, positions and α (rolevec.core.spec), as the config, the CLI and Python read
it."""

from __future__ import annotations

import math

import pytest

from rolevec.core.spec import (
    check_alpha,
    default_layers,
    parse_alphas,
    parse_layer_range,
    parse_layers,
    parse_positions,
)
from rolevec.errors import RolevecError


def test_layer_ranges_are_half_open_with_open_ends_closed_by_the_model() -> None:
    assert default_layers(30) == (1, 24) and default_layers(3) == (1, 2)
    assert parse_layer_range(None, 30) == (1, 24) and parse_layer_range("4:10", 30) == (4, 10)
    assert parse_layer_range("28:", 30) == (28, 31) and parse_layer_range("7", 30) == (7, 8)
    assert parse_layer_range(":3", 30) == (0, 3)
    with pytest.raises(RolevecError, match="out of range"):
        parse_layer_range("0:40", 30)


def test_layer_lists_use_the_same_grammar_with_or_without_a_model() -> None:
    assert parse_layers("3") == [3]
    assert parse_layers("2:5") == [2, 3, 4]
    assert parse_layers("28:", 30) == [28, 29, 30]
    with pytest.raises(RolevecError, match="open-ended"):
        parse_layers("28:")
    for bad in ("5:2", "x", "1:y", ""):
        with pytest.raises(RolevecError, match=r"^layers"):
            parse_layers(bad)


def test_positions_and_alphas() -> None:
    assert parse_positions("all", (-3, -2, -1)) == (-3, -2, -1)
    assert parse_positions(None, (-2, -1)) == (-2, -1)
    assert parse_positions("-1,-2", (-3, -2, -1)) == (-1, -2)
    with pytest.raises(RolevecError, match=r"^positions"):
        parse_positions("-5", (-3, -2, -1))
    assert parse_alphas("1,3,1") == (1.0, 3.0)
    for bad in ("x", ",", "1,inf"):
        with pytest.raises(RolevecError, match=r"^alphas"):
            parse_alphas(bad)


def test_alpha_is_checked_once_and_names_its_field() -> None:
    assert check_alpha(2) == 2.0 and isinstance(check_alpha(2), float)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(RolevecError, match=r"^--alpha must be a finite number"):
            check_alpha(bad, field="--alpha")


def test_the_cli_names_the_flag_a_field_error_came_from() -> None:
    from rolevec.cli.common import as_flags

    with pytest.raises(RolevecError, match=r"^--layers 'x' is not a layer"), as_flags(layers="--layers"):
        parse_layers("x")
    with pytest.raises(RolevecError, match=r"^positions"), as_flags(layers="--layers"):
        parse_positions("-5", (-1,))  # another field's error passes through unchanged
