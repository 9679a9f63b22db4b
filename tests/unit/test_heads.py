import pytest

from attnscope import HeadSet, HeadSpecError


def test_parse_expands_wildcards_and_sorts():
    hs = HeadSet.parse("L1H*,L0H2", n_layers=2, n_heads=3)
    assert list(hs) == [(0, 2), (1, 0), (1, 1), (1, 2)]
    assert str(hs) == "L0H2,L1H0,L1H1,L1H2"
    assert HeadSet.parse(str(hs)) == hs


def test_layer_wildcard():
    assert list(HeadSet.parse("L*H1", n_layers=3, n_heads=2)) == [(0, 1), (1, 1), (2, 1)]


@pytest.mark.parametrize("spec", ["", "L1", "H1", "L1H", "LxH1", "L1H2;L3H4", "l1h2h3"])
def test_malformed_specs_raise(spec):
    with pytest.raises(HeadSpecError):
        HeadSet.parse(spec, n_layers=4, n_heads=4)


def test_out_of_range_names_the_limit():
    with pytest.raises(HeadSpecError, match="layer < 2"):
        HeadSet.parse("L2H0", n_layers=2, n_heads=4)
    with pytest.raises(HeadSpecError, match="head < 4"):
        HeadSet.parse("L0H4", n_layers=2, n_heads=4)


def test_wildcard_without_size_raises():
    with pytest.raises(HeadSpecError, match="wildcard"):
        HeadSet.parse("L0H*")


def test_set_operations():
    a, b = HeadSet([(0, 1)]), HeadSet([(1, 0), (0, 1)])
    assert len(a | b) == 2 and (1, 0) in b and (1, 0) not in a
    assert b.heads_in_layer(0) == [1] and b.layers == [0, 1]
