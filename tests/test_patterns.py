import pytest
import torch

from lmprune.patterns import NM, Block, InputChannel, PatternError, Unstructured, check_sparsity, parse_pattern


@pytest.fixture
def w():
    torch.manual_seed(0)
    return torch.randn(32, 64)


@pytest.mark.parametrize("s", [0.0, 0.25, 0.5, 0.7, 0.9])
def test_unstructured_matrix_exact(w, s):
    p = Unstructured("matrix")
    out = p.project(w, s)
    assert torch.count_nonzero(out).item() == round((1 - s) * w.numel())
    kept = out[out != 0].abs().min() if s < 1 else 0
    dropped = w[out == 0].abs().max() if s > 0 else torch.tensor(0.0)
    assert s == 0 or kept >= dropped  # the largest magnitudes survive
    assert p.verify(out, s).ok


@pytest.mark.parametrize("s", [0.3, 0.5, 0.8])
def test_unstructured_row_exact(w, s):
    out = Unstructured("row").project(w, s)
    assert (torch.count_nonzero(out, dim=1) == round((1 - s) * w.shape[1])).all()


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 4)])
def test_nm_structure(w, n, m):
    p = parse_pattern(f"{n}:{m}")
    out = p.project(w, 0.0)
    groups = torch.count_nonzero(out.reshape(32, -1, m), dim=-1)
    assert (groups == n).all()
    assert p.verify(out, 0.0).ok
    assert p.effective_sparsity(0.3) == pytest.approx(1 - n / m)
    bad = w.clone()
    assert not p.verify(bad, 0.0).ok


def test_nm_rejects_bad_shapes():
    with pytest.raises(PatternError):
        parse_pattern("4:4")
    with pytest.raises(PatternError):
        parse_pattern("5:4")
    with pytest.raises(PatternError, match="not divisible"):
        NM(2, 5).keep_mask(torch.rand(4, 64), 0)


def test_block_and_channel(w):
    out = Block(4).project(w, 0.5)
    tiles = (out.reshape(8, 4, 16, 4) != 0).any(dim=(1, 3))
    assert tiles.sum().item() == 64
    assert ((out.reshape(8, 4, 16, 4) != 0).sum(dim=(1, 3))[tiles] == 16).all()
    assert Block(4).verify(out, 0.5).ok
    cols = InputChannel().project(w, 0.75)
    assert (cols != 0).any(dim=0).sum().item() == 16
    assert InputChannel().verify(cols, 0.75).ok
    assert not InputChannel().verify(w, 0.75).ok


def test_parse_and_sparsity_validation():
    assert parse_pattern("unstructured:row") == Unstructured("row")
    assert parse_pattern("block:8").spec == "block:8"
    assert parse_pattern("channel").spec == "row"
    for bad in ("foo", "block:x", "2-4"):
        with pytest.raises(PatternError):
            parse_pattern(bad)
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(PatternError):
            check_sparsity(bad)
