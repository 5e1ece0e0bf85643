"""minigpt2.factored.FactoredMatrix against TransformerLens's FactoredMatrix on the same random factors."""

from __future__ import annotations

import warnings

import pytest
import torch

from minigpt2.factored import FactoredMatrix, FactoredShapeError

tl_factored = pytest.importorskip("transformer_lens.FactoredMatrix")
TLFactored = tl_factored.FactoredMatrix

TOL = dict(atol=1e-5, rtol=1e-5)
# (A shape, B shape): leading dims that broadcast, mdim below, equal to and above ldim / rdim
SHAPES = [((5, 3), (3, 7)), ((2, 6, 4), (2, 4, 6)), ((3, 1, 6, 2), (4, 2, 6)), ((4, 4), (4, 4)), ((6, 8), (8, 3))]


def factors(shapes, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]


def pair(shapes, seed=0):
    A, B = factors(shapes, seed)
    return FactoredMatrix(A, B), TLFactored(A, B)


def close(x, y, **tol):
    torch.testing.assert_close(x, y, **(tol or TOL))


@pytest.mark.parametrize("shapes", SHAPES)
def test_shape_products_and_transpose(shapes):
    ours, theirs = pair(shapes)
    assert ours.shape == theirs.shape
    assert (ours.ldim, ours.mdim, ours.rdim, ours.ndim) == (theirs.ldim, theirs.mdim, theirs.rdim, theirs.ndim)
    assert ours.has_leading_dims == theirs.has_leading_dims
    close(ours.AB, theirs.AB)
    close(ours.T.AB, theirs.T.AB)
    close(ours.AB, theirs.A @ theirs.B)
    assert all(torch.equal(a, b) for a, b in zip(ours.pair, theirs.pair))
    if ours.ldim == ours.rdim:
        close(ours.BA, theirs.BA)
    else:
        with pytest.raises(AssertionError):
            ours.BA
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("shapes", SHAPES)
def test_svd_equals_transformer_lens(shapes):
    ours, theirs = pair(shapes)
    U, S, V = ours.svd()
    Ut, St, Vt = theirs.svd()
    assert U.shape == Ut.shape and S.shape == St.shape and V.shape == Vt.shape
    close(S, St)
    close(U, Ut)
    close(V, Vt)
    close(U @ torch.diag_embed(S) @ V.transpose(-2, -1), ours.AB)  # V, not V^H, as TransformerLens returns it
    close(ours.U, theirs.U)
    close(ours.S, theirs.S)
    close(ours.V, theirs.V)
    with pytest.warns(DeprecationWarning):
        close(ours.Vh, V)
    close(ours.norm(), theirs.norm())
    close(ours.norm(), torch.linalg.matrix_norm(ours.AB))
    close(ours.collapse_l(), theirs.collapse_l())
    close(ours.collapse_r(), theirs.collapse_r())
    even = ours.make_even()
    close(even.AB, ours.AB)
    close(even.AB, theirs.make_even().AB)
    close(even.A, theirs.make_even().A)


@pytest.mark.parametrize("shapes", [s for s in SHAPES if s[0][-2] == s[1][-1]])
def test_eigenvalues_equal_transformer_lens(shapes):
    ours, theirs = pair(shapes)
    key = lambda e: torch.sort(e.real * 1e3 + e.imag, dim=-1).values  # noqa: E731
    ev, evt = ours.eigenvalues, theirs.eigenvalues
    assert ev.is_complex() and ev.shape == evt.shape
    close(key(ev), key(evt))
    # the nonzero eigenvalues of AB
    full = torch.linalg.eigvals(ours.AB)
    big = lambda e: e[e.abs() > 1e-6]  # noqa: E731
    close(torch.sort(big(ev.flatten()).abs()).values, torch.sort(big(full.flatten()).abs()).values)


@pytest.mark.parametrize("shapes", SHAPES)
def test_matmul_with_tensors_and_factored_matrices(shapes):
    ours, theirs = pair(shapes)
    lead = ours.shape[:-2]
    r, l = ours.rdim, ours.ldim
    vr, vl, mr, ml = factors([(r,), (l,), (r, 5), (3, l)], seed=1)
    for x in (vr, mr, torch.randn(*lead, r, 2, dtype=torch.float64)):
        got, want = ours @ x, theirs @ x
        assert type(got).__name__ == type(want).__name__
        close(got if isinstance(got, torch.Tensor) else got.AB, want if isinstance(want, torch.Tensor) else want.AB)
        assert (got.shape if isinstance(got, torch.Tensor) else got.shape) == want.shape
    for x in (vl, ml):
        got, want = x @ ours, x @ theirs
        assert type(got).__name__ == type(want).__name__
        close(got if isinstance(got, torch.Tensor) else got.AB, want if isinstance(want, torch.Tensor) else want.AB)
    other_A, other_B = factors([(r, 2), (2, 4)], seed=2)
    close((ours @ FactoredMatrix(other_A, other_B)).AB, (theirs @ TLFactored(other_A, other_B)).AB)
    X, Y = factors([(4, 2), (2, l)], seed=3)
    close((FactoredMatrix(X, Y) @ ours).AB, (TLFactored(X, Y) @ theirs).AB)
    close((FactoredMatrix(X, Y) @ ours).AB, X @ Y @ ours.AB)
    close((ours * 2.5).AB, (theirs * 2.5).AB)
    close((3 * ours).AB, (3 * theirs).AB)
    close((ours * torch.tensor(-1.5, dtype=torch.float64)).AB, -1.5 * ours.AB)


def test_factored_times_factored_is_the_product():
    A1, B1, A2, B2 = factors([(2, 5, 3), (2, 3, 6), (6, 2), (2, 4)])
    left, right = FactoredMatrix(A1, B1), FactoredMatrix(A2, B2)
    close((left @ right).AB, left.AB @ right.AB)
    close((left.T.T).AB, left.AB)
    with pytest.raises(AssertionError):  # 6 columns against 5 rows
        left @ left
    with pytest.raises(ValueError, match="inner dimension"):
        FactoredMatrix(A1, A1)


@pytest.mark.parametrize("idx", [0, -1, (1,), (slice(None), 2), (0, 1), (0, -1), (1, slice(0, 2)),
                                 (0, 1, 2), (-1, -1, -1), (slice(None), slice(1, 3), 0), (None, 0)])
def test_getitem_equals_transformer_lens(idx):
    ours, theirs = pair(((3, 4, 6), (3, 6, 5)))
    got, want = ours[idx], theirs[idx]
    assert got.shape == want.shape
    close(got.AB, want.AB)


def test_getitem_too_long_and_unsqueeze():
    ours, theirs = pair(((3, 4, 6), (3, 6, 5)))
    with pytest.raises(ValueError, match="too long an index"):
        ours[0, 0, 0, 0]
    assert ours.unsqueeze(0).shape == theirs.unsqueeze(0).shape == (1, 3, 4, 5)
    close(ours.unsqueeze(1).AB, theirs.unsqueeze(1).AB)


@pytest.mark.parametrize("k", [2, 3, 10])
def test_get_corner(k):
    ours, theirs = pair(((3, 4, 6), (3, 6, 5)))
    close(ours.get_corner(k), theirs.get_corner(k))


def test_bad_shapes_are_named():
    A, B = factors([(4, 3), (5, 2)])
    with pytest.raises(FactoredShapeError, match="inner dimension"):
        FactoredMatrix(A, B)
    with pytest.raises(ValueError, match="broadcast"):
        FactoredMatrix(torch.randn(2, 4, 3), torch.randn(3, 3, 5))
    m = FactoredMatrix(*factors([(4, 3), (3, 5)]))
    with pytest.raises(AssertionError, match="Right matrix"):
        m @ torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="Left matrix"):
        torch.randn(2, 5, dtype=torch.float64) @ m
    with pytest.raises(ValueError, match="scalar"):
        m * torch.ones(2)


def test_float32_spectrum_is_close_to_float64():
    """model.OV / QK are float32: their singular values and norms agree with a float64 computation."""
    A, B = factors([(12, 32, 8), (12, 8, 32)], dtype=torch.float32)
    m, m64 = FactoredMatrix(A, B), FactoredMatrix(A.double(), B.double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(m.S.double(), m64.S, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m.norm().double(), m64.norm(), atol=1e-4, rtol=1e-5)
