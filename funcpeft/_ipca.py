"""Incremental PCA as EVA uses it: PEFT's `peft.utils.incremental_pca.IncrementalPCA` (partial_fit with
torch.svd_lowrank seeded 42), the same arithmetic step for step so that EVA's components equal PEFT's.

(scikit-learn's IncrementalPCA, adapted to torch by PEFT.)
"""

from __future__ import annotations

import torch


class IncrementalPCA:
    """`partial_fit(X)` on batches X (n_samples, n_features); after it: components_ (k, n_features),
    singular_values_ (k,), explained_variance_ratio_ (k,), with k = n_components."""

    singular_values_: torch.Tensor
    explained_variance_ratio_: torch.Tensor

    def __init__(self, n_components: int, lowrank_seed: int | None = 42, lowrank_niter: int = 4):
        self.n_components = n_components
        self.lowrank_q = n_components * 2
        self.lowrank_niter = lowrank_niter
        self.lowrank_seed = lowrank_seed
        self.n_features_: int | None = None
        self.components_: torch.Tensor | None = None

    def _svd(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        seeded = self.lowrank_seed is not None
        with torch.random.fork_rng(enabled=seeded):
            if seeded:
                torch.manual_seed(self.lowrank_seed)  # type: ignore[arg-type]
            U, S, V = torch.svd_lowrank(X, q=self.lowrank_q, niter=self.lowrank_niter)
            return U, S, V.mH

    def _validate(self, X: torch.Tensor) -> torch.Tensor:
        X = X.clone()
        n_samples, n_features = X.shape
        if self.n_components > n_features:
            raise ValueError(
                f"n_components={self.n_components} invalid for n_features={n_features}, "
                "need more rows than columns for IncrementalPCA processing."
            )
        if self.n_components > n_samples:
            raise ValueError(
                f"n_components={self.n_components} must be less or equal to the batch number of samples {n_samples}"
            )
        return X if X.dtype in (torch.float32, torch.float64) else X.to(torch.float32)

    @staticmethod
    def _mean_and_var(
        X: torch.Tensor, last_mean: torch.Tensor | None, last_variance: torch.Tensor | None, last_count: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        if X.shape[0] == 0:
            return last_mean, last_variance, last_count
        new_count = torch.tensor([X.shape[0]], device=X.device)
        updated_count = last_count + new_count
        last_sum = (
            torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
            if last_mean is None
            else last_mean * last_count
        )
        new_sum = X.sum(dim=0, dtype=torch.float64)
        updated_mean = (last_sum + new_sum) / updated_count
        T = new_sum / new_count
        temp = X - T
        correction = temp.sum(dim=0, dtype=torch.float64).square()
        temp.square_()
        new_unnormalized_variance = temp.sum(dim=0, dtype=torch.float64)
        new_unnormalized_variance -= correction / new_count
        if last_variance is None:
            return updated_mean, new_unnormalized_variance / updated_count, updated_count
        last_unnormalized_variance = last_variance * last_count
        last_over_new_count = last_count.double() / new_count
        updated_unnormalized_variance = (
            last_unnormalized_variance
            + new_unnormalized_variance
            + last_over_new_count / updated_count * (last_sum / last_over_new_count - new_sum).square()
        )
        return updated_mean, updated_unnormalized_variance / updated_count, updated_count

    @staticmethod
    def _svd_flip(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Signs fixed by v's largest entries (PEFT's u_based_decision=False)."""
        max_abs_rows = torch.argmax(torch.abs(v), dim=1)
        signs = torch.sign(v[range(v.shape[0]), max_abs_rows])
        u *= signs[: u.shape[1]].view(1, -1)
        v *= signs.view(-1, 1)
        return u, v

    def partial_fit(self, X: torch.Tensor) -> IncrementalPCA:
        first_pass = self.components_ is None
        X = self._validate(X)
        n_samples, n_features = X.shape
        if first_pass:
            self.mean_: torch.Tensor | None = None
            self.var_: torch.Tensor | None = None
            self.n_samples_seen_ = torch.tensor([0], device=X.device)
            self.n_features_ = n_features
        if n_features != self.n_features_:
            raise ValueError(
                "Number of features of the new batch does not match the number of features of the first batch."
            )
        col_mean, col_var, n_total_samples = self._mean_and_var(X, self.mean_, self.var_, self.n_samples_seen_)
        assert col_mean is not None and col_var is not None
        if first_pass:
            X -= col_mean
        else:
            assert self.mean_ is not None and self.components_ is not None
            col_batch_mean = torch.mean(X, dim=0)
            X -= col_batch_mean
            mean_correction_factor = torch.sqrt((self.n_samples_seen_.double() / n_total_samples) * n_samples)
            mean_correction = mean_correction_factor * (self.mean_ - col_batch_mean)
            X = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, X, mean_correction))
        U, S, Vt = self._svd(X)
        U, Vt = self._svd_flip(U, Vt)
        explained_variance_ratio = S**2 / torch.sum(col_var * n_total_samples)
        self.n_samples_seen_ = n_total_samples
        self.components_ = Vt[: self.n_components]
        self.singular_values_ = S[: self.n_components]
        self.mean_ = col_mean
        self.var_ = col_var
        self.explained_variance_ratio_ = explained_variance_ratio[: self.n_components]
        return self
