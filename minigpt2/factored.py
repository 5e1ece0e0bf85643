"""FactoredMatrix: a matrix kept as the product A @ B of its two factors, as TransformerLens has it.

``model.OV`` and ``model.QK`` are FactoredMatrix [L, H, d_model, d_model] whose inner
dimension is d_head: their SVD, norm and eigenvalues cost d_head-sized work, and
``AB`` builds the full product only when asked. Semantics are TransformerLens 3.x's
(transformer_lens.FactoredMatrix), method for method:

    A [..., ldim, mdim], B [..., mdim, rdim]; leading dims broadcast
    AB / BA                 the products (BA needs ldim == rdim)
    T                       the transpose, still factored
    svd()                   (U [..., ldim, mdim], S [..., mdim], V [..., rdim, mdim]) with
                            M == U @ S.diag_embed() @ V.transpose(-2, -1)  (V, not V^H: TransformerLens's convention)
    U, S, V, Vh             the parts of svd(); Vh is TransformerLens's deprecated alias of V
    eigenvalues             of BA (those of AB apart from zeros), complex
    norm()                  Frobenius norm
    @                       with a tensor (vector or matrix, either side) or another FactoredMatrix
    *                       by a scalar
    m[i, ...]               indexes the leading dims (one more index slices rows, another columns)
"""

from __future__ import annotations

import warnings
from functools import cached_property

import torch


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


class FactoredShapeError(ValueError, AssertionError):
    """Shapes that do not compose: a ValueError that is also the AssertionError TransformerLens raises."""


def get_corner(tensor: torch.Tensor, n: int = 3) -> torch.Tensor:
    """The top-left n x n x ... corner of a tensor."""
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


class FactoredMatrix:
    """The matrix A @ B, kept as its factors A [..., ldim, mdim] and B [..., mdim, rdim]."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"FactoredMatrix needs A [..., ldim, mdim] and B [..., mdim, rdim] (at least 2-D), "
                             f"got shapes {tuple(A.shape)} and {tuple(B.shape)}")
        if A.size(-1) != B.size(-2):
            raise FactoredShapeError(f"Factored matrix must match on inner dimension, shapes were a: {A.shape}, "
                                     f"b:{B.shape}")
        self.ldim, self.mdim, self.rdim = A.size(-2), A.size(-1), B.size(-1)
        self.has_leading_dims = A.ndim > 2 or B.ndim > 2
        try:
            lead = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError as e:
            raise ValueError(f"Shape mismatch: cannot broadcast the leading dimensions of A {tuple(A.shape)} "
                             f"and B {tuple(B.shape)}") from e
        self.shape = torch.Size(lead + (self.ldim, self.rdim))
        self.A = A.broadcast_to(lead + (self.ldim, self.mdim))
        self.B = B.broadcast_to(lead + (self.mdim, self.rdim))

    # ------------------------------------------------------------------ products
    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return (self @ other.A) @ other.B
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        if other.ndim < 2:  # a vector: collapse to a vector
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.size(-2) != self.rdim:
            raise FactoredShapeError(f"Right matrix must match on inner dimension, shapes were self: {self.shape}, "
                             f"other:{other.shape}")
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return other.A @ (other.B @ self)
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        if other.size(-1) != self.ldim:
            raise FactoredShapeError(f"Left matrix must match on inner dimension, shapes were self: {self.shape}, "
                             f"other:{other.shape}")
        if other.ndim < 2:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar) -> "FactoredMatrix":
        if isinstance(scalar, torch.Tensor) and scalar.numel() != 1:
            raise ValueError(f"Tensor must be a scalar for use with * but was of shape {scalar.shape}. "
                             "For matrix multiplication, use @ instead.")
        return FactoredMatrix(self.A * scalar, self.B)

    def __rmul__(self, scalar) -> "FactoredMatrix":
        return self * scalar

    @property
    def AB(self) -> torch.Tensor:
        """The full product [..., ldim, rdim] (costly for big ldim, rdim)."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """The reverse product [..., mdim, mdim]; only defined when ldim == rdim."""
        if self.rdim != self.ldim:
            raise FactoredShapeError(f"Can only take ba if ldim==rdim, shapes were self: {self.shape}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        return FactoredMatrix(_t(self.B), _t(self.A))

    # ------------------------------------------------------------------ spectrum
    @cached_property
    def _svd(self):
        # SVD of each factor, then of the small mdim x mdim middle: never the ldim x rdim product.
        Ua, Sa, Vha = torch.linalg.svd(self.A, full_matrices=False)
        Ub, Sb, Vhb = torch.linalg.svd(self.B, full_matrices=False)
        middle = Sa[..., :, None] * Vha @ Ub * Sb[..., None, :]
        Um, Sm, Vhm = torch.linalg.svd(middle, full_matrices=False)
        return Ua @ Um, Sm, _t(Vhb) @ _t(Vhm)

    def svd(self):
        """(U [..., ldim, mdim], S [..., mdim], V [..., rdim, mdim]) with M == U @ diag(S) @ V^T."""
        return self._svd

    @property
    def U(self) -> torch.Tensor:
        return self.svd()[0]

    @property
    def S(self) -> torch.Tensor:
        return self.svd()[1]

    @property
    def V(self) -> torch.Tensor:
        """Right singular vectors [..., rdim, mdim]: M == U @ diag(S) @ V^T."""
        return self.svd()[2]

    @property
    def Vh(self) -> torch.Tensor:
        """TransformerLens's deprecated alias: returns V (not its transpose)."""
        warnings.warn("FactoredMatrix.Vh has always returned V (right singular vectors), not Vh. Use .V; for the "
                      "Hermitian transpose use .V.transpose(-2, -1).", DeprecationWarning, stacklevel=2)
        return self.svd()[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues [..., mdim] (complex) of BA, which are AB's apart from zeros."""
        BA = self.BA
        if BA.dtype in (torch.bfloat16, torch.float16):
            BA = BA.float()
        return torch.linalg.eig(BA).eigenvalues

    def norm(self) -> torch.Tensor:
        """Frobenius norm [...]: sqrt of the sum of squared singular values."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> "FactoredMatrix":
        """The same matrix as (U sqrt(S), sqrt(S) V^T): each factor carries half of each singular value."""
        root = self.S.sqrt()
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * _t(self.V))

    def collapse_l(self) -> torch.Tensor:
        """[..., mdim, rdim]: the matrix with its left orthogonal factor U removed (diag(S) @ V^T)."""
        return self.S[..., :, None] * _t(self.V)

    def collapse_r(self) -> torch.Tensor:
        """[..., ldim, mdim]: U @ diag(S)."""
        return self.U * self.S[..., None, :]

    # ------------------------------------------------------------------ shape
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A, self.B

    def unsqueeze(self, k: int) -> "FactoredMatrix":
        return FactoredMatrix(self.A.unsqueeze(k), self.B.unsqueeze(k))

    def get_corner(self, k: int = 3) -> torch.Tensor:
        return get_corner(self.A[..., :k, :] @ self.B[..., :, :k], k)

    @staticmethod
    def _keep_dim(idx: tuple, i: int) -> tuple:
        # An int index at i becomes a length-1 slice, so that A and B keep that dim.
        idx = list(idx)
        if isinstance(idx[i], int):
            v = idx[i]
            idx[i] = slice(v, v + 1 if v != -1 else None)
        return tuple(idx)

    def __getitem__(self, idx) -> "FactoredMatrix":
        """Index the leading dims; one more index selects rows (of A), another columns (of B)."""
        if not isinstance(idx, tuple):
            idx = (idx,)
        n = len([i for i in idx if i is not None])
        lead = len(self.shape) - 2
        if n <= lead:
            return FactoredMatrix(self.A[idx], self.B[idx])
        if n == lead + 1:
            idx = self._keep_dim(idx, -1)
            return FactoredMatrix(self.A[idx], self.B[idx[:-1]])
        if n == lead + 2:
            idx = self._keep_dim(self._keep_dim(idx, -1), -2)
            return FactoredMatrix(self.A[idx[:-1]], self.B[idx[:-2] + (slice(None), idx[-1])])
        raise ValueError(f"{idx} is too long an index for a FactoredMatrix with shape {tuple(self.shape)}")

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"


__all__ = ["FactoredMatrix", "FactoredShapeError", "get_corner"]
