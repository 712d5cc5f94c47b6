"""State memory operations: key rotation, concatenation (exact for one layer), weighted averages."""

from __future__ import annotations

import pytest
import torch

from model.memory import merge_average, merge_concat, rotate_keys
from model.retnet import RetNet
from model.state import RetentionState, StateMismatchError
from tests.support.models import random_ids, random_model


def _model(layers: int, dtype: torch.dtype = torch.float64, **kw) -> RetNet:
    return random_model(dtype, seed=layers, num_hidden_layers=layers, **kw)


@pytest.fixture(scope="module")
def m1() -> RetNet:
    return _model(1)


@pytest.fixture(scope="module")
def m2() -> RetNet:
    return _model(2)


def _max_abs(a: RetentionState, b: RetentionState) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a.layers, b.layers, strict=True))


def _read(m: RetNet, ids: torch.Tensor, start: int = 0) -> RetentionState:
    """Read ids from an empty state positioned at `start`."""
    st = m.empty_state(ids.shape[0])
    st.position.fill_(start)
    with torch.inference_mode():
        return m(ids, state=st)[1]


# ---- rotation -------------------------------------------------------------------------------
def test_rotations_compose_and_invert(m2):
    s = _read(m2, random_ids(1, 40, 1))
    ab = rotate_keys(rotate_keys(s, 17), 250)
    assert _max_abs(ab, rotate_keys(s, 267)) < 1e-10
    assert _max_abs(rotate_keys(rotate_keys(s, 123), -123), s) < 1e-12
    assert _max_abs(rotate_keys(s, 0), s) == 0.0
    assert torch.equal(ab.position, s.position)  # the position is the caller's business
    assert _max_abs(rotate_keys(s, 5), s) > 1e-3  # it does rotate


@pytest.mark.parametrize("delta", [1, 30, 1000])
def test_rotating_equals_reading_at_shifted_positions(m2, delta):
    # With an empty start the outputs depend only on relative positions, so every layer's state read
    # at positions delta.. is the rotated state read at 0.. (exactly, up to rounding).
    ids = random_ids(1, 50, 2)
    assert _max_abs(rotate_keys(_read(m2, ids), delta), _read(m2, ids, delta)) < 1e-10


def test_per_row_deltas(m2):
    ids = torch.cat([random_ids(1, 20, 3), random_ids(1, 20, 4)])
    s = _read(m2, ids)
    r = rotate_keys(s, torch.tensor([3, 11]))
    assert _max_abs(r.select([0]), rotate_keys(s.select([0]), 3)) == 0.0
    assert _max_abs(r.select([1]), rotate_keys(s.select([1]), 11)) == 0.0
    with pytest.raises(ValueError, match="entries"):
        rotate_keys(s, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        rotate_keys(s, 1.5)


# ---- concatenation --------------------------------------------------------------------------
def test_one_layer_concat_is_exact(m1):
    parts = [random_ids(1, 30, 5), random_ids(1, 45, 6), random_ids(1, 7, 7)]
    states = [_read(m1, p) for p in parts]
    whole = _read(m1, torch.cat(parts, 1))
    two = merge_concat(states[:2])
    assert two.position.tolist() == [75]
    assert _max_abs(two, _read(m1, torch.cat(parts[:2], 1))) < 1e-10
    three = merge_concat(states)
    assert three.position.tolist() == [82]
    assert _max_abs(three, whole) < 1e-10
    # and the merged state continues like the real one
    nxt = random_ids(1, 5, 8)
    with torch.inference_mode():
        a, _ = m1(nxt, state=three)
        b, _ = m1(nxt, state=whole)
    assert (a - b).abs().max().item() < 1e-10


def test_multi_layer_concat_is_an_approximation(m2):
    p1, p2 = random_ids(1, 30, 9), random_ids(1, 40, 10)
    merged = merge_concat([_read(m2, p1), _read(m2, p2)])
    exact = _read(m2, torch.cat([p1, p2], 1))
    assert merged.position.tolist() == [70]
    assert (merged.layers[0] - exact.layers[0]).abs().max().item() < 1e-10  # layer 0 is exact
    assert (merged.layers[1] - exact.layers[1]).abs().max().item() > 1e-4  # deeper ones are not
    assert torch.isfinite(merged.layers[1]).all()


def test_concat_of_one_and_float32(m1):
    s = _read(m1, random_ids(1, 9, 11))
    assert _max_abs(merge_concat([s]), s) == 0.0
    m32 = _model(1, torch.float32)
    parts = [random_ids(1, 20, 12), random_ids(1, 25, 13)]
    merged = merge_concat([_read(m32, p) for p in parts])
    exact = _read(m32, torch.cat(parts, 1))
    assert merged.dtype == torch.float32
    rel = (merged.layers[0] - exact.layers[0]).abs().max() / exact.layers[0].abs().max()
    assert rel.item() < 1e-5


def test_sources_are_checked(m1, m2):
    s = _read(m1, random_ids(1, 5, 14))
    with pytest.raises(ValueError, match="non-empty"):
        merge_concat([])
    with pytest.raises(ValueError, match="one row"):
        merge_concat([s, RetentionState.stack([s, s])])
    with pytest.raises(StateMismatchError, match="another shape"):
        merge_concat([s, _read(m2, random_ids(1, 5, 14))])
    with pytest.raises(StateMismatchError, match="float32"):
        merge_average([s, s.to(dtype=torch.float32)])
    with pytest.raises(ValueError, match="RetentionState"):
        merge_concat([s, "state"])  # type: ignore[list-item]


# ---- average --------------------------------------------------------------------------------
def test_average_shifts_to_the_largest_position(m1):
    s_short, s_long = _read(m1, random_ids(1, 10, 15)), _read(m1, random_ids(1, 35, 16))
    first = merge_average([s_short, s_long], [1, 0])
    assert first.position.tolist() == [35]
    assert _max_abs(first, rotate_keys(s_short, 25)) == 0.0
    # shifted = the short text read so that it ends where the long one ends
    assert _max_abs(first, _read(m1, random_ids(1, 10, 15), 25)) < 1e-10
    second = merge_average([s_short, s_long], [0.0, 1.0])
    assert _max_abs(second, s_long) == 0.0  # the longest source is not moved
    half = merge_average([s_short, s_long])
    expected = [0.5 * a + 0.5 * b for a, b in zip(first.layers, s_long.layers, strict=True)]
    assert max((a - b).abs().max().item() for a, b in zip(half.layers, expected, strict=True)) < 1e-12


@pytest.mark.parametrize(
    "weights,match",
    [
        ([0.5, 0.6], "sum to 1"),
        ([1.5, -0.5], ">= 0"),
        ([float("nan"), 1.0], "finite"),
        ([float("inf"), 0.0], "finite"),
        ([1.0], "one weight per state"),
        ([True, False], "finite numbers"),
    ],
)
def test_average_weights_are_validated(m1, weights, match):
    s = _read(m1, random_ids(1, 4, 17))
    with pytest.raises(ValueError, match=match):
        merge_average([s, s], weights)


def test_average_weights_within_tolerance(m1):
    s = _read(m1, random_ids(1, 4, 18))
    out = merge_average([s, s, s], torch.tensor([1 / 3, 1 / 3, 1 / 3 + 5e-7], dtype=torch.float64))
    assert _max_abs(out, s) < 1e-6
