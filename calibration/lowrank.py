"""Activation-aware low-rank factors: W ~= A B minimising ||(W - A B) X^T|| (LiteFFN / SVD-LLM).

With R = E[x x^T] + damping = S S^T, the error above is ||(W - A B) S||_F, so the best rank-r
A B is the truncated SVD of W S mapped back through S^-1. S comes from the eigendecomposition
R = Q diag(e) Q^T as S = Q diag(sqrt e), or from its Cholesky factor (any S with S S^T = R gives
the same optimum). Without statistics S = I: plain SVD.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class Whitening:
    """A factor S with S S^T = R + damp * mean(diag R) * I.

    method "eigh": S = Q diag(sqrt e) from R = Q diag(e) Q^T (eigenvalues floored at the damping).
    method "cholesky": S = L, the Cholesky factor. Both give the same optimal low-rank factors
    and the same GPTQ Hessian; Cholesky is ~20x faster at 16384 wide (bench/compress_time_h100.md)."""

    def __init__(self, R: torch.Tensor, damp: float = 0.01, method: str = "cholesky"):
        R = R.float()
        if not torch.isfinite(R).all():
            raise ValueError("covariance contains NaN or Inf; re-run calibration")
        if method not in ("eigh", "cholesky"):
            raise ValueError(f"whitening method must be 'eigh' or 'cholesky', got {method!r}")
        self.method, self.damp = method, damp
        lam = damp * R.diagonal().mean().clamp_min(1e-12)
        Rd = R + lam * torch.eye(R.shape[0], device=R.device)
        if method == "eigh":
            evals, self.Q = torch.linalg.eigh(Rd)
            self.evals = evals.clamp_min(lam)
        else:
            self.L, info = torch.linalg.cholesky_ex(Rd)
            if int(info) != 0:  # only for pathological (indefinite) input: fall back
                self.__init__(R, damp, "eigh")

    def damped(self) -> torch.Tensor:
        """The damped covariance, used as the Hessian of residual quantization."""
        if self.method == "eigh":
            return (self.Q * self.evals) @ self.Q.T
        return self.L @ self.L.T

    def inverse(self) -> torch.Tensor:
        if self.method == "eigh":
            return (self.Q / self.evals) @ self.Q.T
        return torch.cholesky_inverse(self.L)

    def apply(self, W: torch.Tensor) -> torch.Tensor:  # W S
        if self.method == "eigh":
            return (W @ self.Q) * self.evals.sqrt()
        return W @ self.L

    def unapply(self, Bw: torch.Tensor) -> torch.Tensor:  # Bw S^-1
        if self.method == "eigh":
            return (Bw * self.evals.rsqrt()) @ self.Q.T
        return torch.linalg.solve_triangular(self.L, Bw, upper=False, left=False)


# rank steps of the per-layer search that `match` asks for
MATCH_STEP = 16


@dataclass
class RankPolicy:
    """Fixed rank (`rank`), or the smallest rank whose factors hold `energy` of the (whitened)
    spectrum's energy, capped at `max_rank`. rank=0 keeps no low-rank branch.

    With `match` (and a fixed `rank`): per layer, the smallest rank in steps of MATCH_STEP from `rank`,
    at most `max_rank`, whose output error on the statistics' held-out rows is at most `match` times
    that of an FP8 residual at `rank` (compress.compress_linear searches it). It spends the rank where a
    4-bit residual loses most to FP8 and takes it from where it loses least (issue 20)."""

    rank: int | None = 64
    energy: float | None = None
    max_rank: int = 512
    match: float | None = None

    def __post_init__(self):
        if (self.rank is None) == (self.energy is None):
            raise ValueError("give either a fixed rank or an energy threshold, not both")
        if self.match is not None:
            if self.rank is None:
                raise ValueError("matching FP8's error per layer starts from a fixed rank: give a rank, not an "
                                 "energy threshold")
            if isinstance(self.match, bool) or not isinstance(self.match, (int, float)) or not (
                    math.isfinite(self.match) and self.match > 0):
                raise ValueError(f"the error ratio to match must be a number > 0 (e.g. 1.8: within 1.8x the FP8 "
                                 f"residual's error), got {self.match!r}")
        if self.rank is not None and self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy threshold must be in (0, 1], got {self.energy}")
        for what, v in (("rank", self.rank), ("max_rank", self.max_rank)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{what} must be a whole number >= 0, got {v!r}")

    def choose(self, sigma2: torch.Tensor, name: str = "", full: int | None = None) -> int:
        """sigma2: squared singular values, descending."""
        full = len(sigma2) if full is None else full
        if self.rank is not None:
            if self.rank > full:
                raise ValueError(
                    f"rank {self.rank} is larger than layer {name or '?'} allows (min(out, in) = {full}); "
                    f"use a rank <= {full}"
                )
            return self.rank
        cum = torch.cumsum(sigma2.double(), 0) / sigma2.double().sum().clamp_min(1e-300)
        r = int(torch.searchsorted(cum, torch.tensor(self.energy, dtype=cum.dtype, device=cum.device)).item()) + 1
        return min(r, self.max_rank, full)

    @classmethod
    def matching(cls, rank: int, match: float, max_rank: int | None = None) -> "RankPolicy":
        """The `match` policy from `rank`, searching up to max_rank (default twice `rank`, at least one step)."""
        return cls(rank=rank, match=match, max_rank=max_rank or max(2 * rank, MATCH_STEP))

    @property
    def fixed_rank(self) -> int:
        """Every layer's rank where the policy fixes it, else 0: the least a layer can get (the lower bound that
        file size checks take before the work)."""
        return self.rank if (self.rank is not None and self.match is None) else 0

    def describe(self) -> str:
        if self.match is not None:
            return f"r per layer within {self.match:g}x FP8's error at r={self.rank} (max {self.max_rank})"
        return f"r={self.rank}" if self.rank is not None else f"energy>={self.energy} (max {self.max_rank})"


def top_svd(M: torch.Tensor, k: int):
    """Top-k singular triplets of M [N, K] and all squared singular values.

    Through the eigendecomposition of the smaller Gram matrix: LTX-2's FFN matrices are
    4096x16384, so this is a 4096^2 eigh instead of a full SVD, and it still yields the whole
    spectrum the energy policy needs."""
    n, kk = M.shape
    if n <= kk:
        ev, U = torch.linalg.eigh(M @ M.T)
        ev, U = ev.flip(0).clamp_min(0), U.flip(1)
        s = ev[:k].sqrt()
        U = U[:, :k]
        Vt = (U.T @ M) / s.clamp_min(1e-30)[:, None]
    else:
        ev, V = torch.linalg.eigh(M.T @ M)
        ev, V = ev.flip(0).clamp_min(0), V.flip(1)
        s = ev[:k].sqrt()
        Vt = V[:, :k].T
        U = (M @ Vt.T) / s.clamp_min(1e-30)[None, :]
    return U, s, Vt, ev


def refine_factors(W: torch.Tensor, whitening: Whitening | None, A: torch.Tensor, B: torch.Tensor,
                   iters: int = 1) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The rank-r factors of W (as lowrank_factors gives them) by subspace iteration started from B's row
    space: for compress.py's refits, whose targets move little from one to the next. A few products with
    W instead of the Gram matrix's eigendecomposition (0.14-0.19 s per FFN linear on an H100); on the
    tests' layers the errors after 2 and after 8 refits equal the exact SVD's. Also returns what the factors
    miss of W, squared, in the whitened space (||M||^2 - ||Q^T M||^2, before the factors' rounding to bf16)."""
    M = whitening.apply(W.float()) if whitening is not None else W.float()
    Bw = whitening.apply(B.float()) if whitening is not None else B.float()
    V = torch.linalg.qr(Bw.T)[0]
    for _ in range(iters):
        V = torch.linalg.qr(M.T @ torch.linalg.qr(M @ V)[0])[0]
    Q = torch.linalg.qr(M @ V)[0]
    C = Q.T @ M
    Uc, s, Vt = torch.linalg.svd(C, full_matrices=False)
    A, B = _split(Q @ Uc, s, Vt, whitening)
    missed = float(M.square().sum(dtype=torch.float64) - C.square().sum(dtype=torch.float64))  # (2 large sums)
    return A, B, max(missed, 0.0)


def _split(U: torch.Tensor, s: torch.Tensor, Vt: torch.Tensor, whitening: Whitening | None):
    """(A, B) of a whitened truncated SVD, sqrt(sigma) on each side, B back in the input's space."""
    root = s.sqrt()
    Bw = root[:, None] * Vt
    return U * root, (whitening.unapply(Bw) if whitening is not None else Bw)


def lowrank_factors(W: torch.Tensor, whitening: Whitening | None, policy: RankPolicy, name: str = ""):
    """Returns (A [N, r], B [r, K], info) in fp32, with sqrt(sigma) split evenly between A and B
    so neither factor's range is extreme in bf16."""
    W = W.float()
    full = min(W.shape)
    M = whitening.apply(W) if whitening is not None else W
    if policy.rank == 0:
        return W.new_zeros(W.shape[0], 0), W.new_zeros(0, W.shape[1]), {"rank": 0, "energy": 0.0}
    kmax = policy.rank if policy.rank is not None else min(policy.max_rank, full)
    if policy.rank is not None and policy.rank > full:
        policy.choose(torch.ones(full), name, full)  # raises the clear error
    U, s, Vt, sigma2 = top_svd(M, kmax)
    r = policy.choose(sigma2, name, full)
    A, B = _split(U[:, :r], s[:r], Vt[:r], whitening)
    energy = float(sigma2[:r].sum() / sigma2.sum().clamp_min(1e-30))
    return A, B, {"rank": r, "energy": energy}
