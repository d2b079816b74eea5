"""GPTQ (arXiv 2210.17323) with the stored input covariance as its Hessian: 4-bit weights whose rounding errors
are pushed onto the columns not yet rounded, so that the layer's output on the calibration inputs moves least.

Symmetric integers in [-8, 7] with one scale per row and group of ``group_size`` columns, set from the weight
before rounding (max |w| / 7.5, as compressed-tensors' observers set them) and kept in the dtype the checkpoint
stores them in; columns in their natural order (no act-order), so a group's columns are contiguous and the format
needs no index. The Hessian's scale does not matter: the damping is relative to its mean diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from corda_surgery.checkpoint.quantised import int4_dequantised, int4_tensors
from corda_surgery.decomposition.decompose import DecompositionError

BITS = 4
Q_MIN, Q_MAX = -(1 << (BITS - 1)), (1 << (BITS - 1)) - 1
DEFAULT_GROUP_SIZE = 128
DEFAULT_GPTQ_DAMPING = 0.01  # GPTQ's percdamp: λ·mean(diag H) added to the diagonal
BLOCK_COLUMNS = 128  # columns rounded before their errors are pushed onto the rest in one product


@dataclass(frozen=True)
class GroupQuantised:
    """4-bit integers (int8 storage, (out, in)), a scale per row and group ((out, in / group_size))."""

    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int

    @property
    def dequantised(self) -> torch.Tensor:
        """The float32 weight the codes stand for: what the checkpoint's loader computes."""
        return int4_dequantised(self.codes, self.scales)

    def tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The stored tensors that replace the weight ``key``: compressed-tensors' pack-quantized."""
        return int4_tensors(key, self.codes, self.scales)


def group_scales(weight: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Each row's and group's symmetric scale, max |w| / 7.5 (a zero group gets the dtype's ε), in ``dtype``."""
    out_dim, in_dim = weight.shape
    largest = weight.float().abs().reshape(out_dim, in_dim // group_size, group_size).amax(dim=2)
    scales = (largest / ((Q_MAX - Q_MIN) / 2)).to(dtype)
    return torch.where(scales == 0, torch.finfo(dtype).eps, scales)


def check_group_size(in_dim: int, group_size: int, name: str) -> None:
    if group_size < 1 or in_dim % group_size:
        raise DecompositionError(f"{name}: {in_dim} inputs do not split into groups of {group_size} (`group_size`)")


@dataclass(frozen=True)
class HessianFactor:
    """The upper Cholesky factor of the damped H⁻¹ and H's dead inputs: what GPTQ needs of a Hessian, computed once
    for every weight (and every refit round) that reads the same input."""

    h_inv: torch.Tensor  # float32 (in, in)
    dead: torch.Tensor  # bool (in,): inputs that never varied


def hessian_factor(hessian: torch.Tensor, damping: float = DEFAULT_GPTQ_DAMPING, name: str = "weight") -> HessianFactor:
    """H (zero diagonal entries set to 1) damped by ``damping``·mean(diag H), inverted, factorised; float32, as the
    reference's."""
    h = hessian.to(torch.float32, copy=True)
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    h.diagonal().add_(damping * h.diagonal().mean())
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise DecompositionError(f"{name}: the Hessian is not positive definite at GPTQ damping {damping:g}")
    return HessianFactor(torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True), dead)


def gptq_quantise(
    weight: torch.Tensor,
    hessian: torch.Tensor | HessianFactor,
    *,
    group_size: int = DEFAULT_GROUP_SIZE,
    damping: float = DEFAULT_GPTQ_DAMPING,
    scale_dtype: torch.dtype = torch.float32,
    name: str = "weight",
) -> GroupQuantised:
    """``weight`` (out, in) rounded to 4-bit codes column by column, each rounding error spread over the columns
    after it through the Cholesky factor of H⁻¹ (``hessian``: H, (in, in), damped by ``damping``·mean(diag H), or
    its ``hessian_factor``); inputs that never varied (zero diagonal) get zero weight. float32 arithmetic, as the
    reference's."""
    out_dim, in_dim = weight.shape
    check_group_size(in_dim, group_size, name)
    if tuple(hessian.h_inv.shape if isinstance(hessian, HessianFactor) else hessian.shape) != (in_dim, in_dim):
        raise DecompositionError(f"{name}: the Hessian does not match the weight's {in_dim} inputs")
    factor = hessian if isinstance(hessian, HessianFactor) else hessian_factor(hessian, damping, name)
    h_inv = factor.h_inv
    w = weight.to(torch.float32, copy=True)
    scales = group_scales(w, group_size, scale_dtype)
    column_scales = scales.float().repeat_interleave(group_size, dim=1)
    w[:, factor.dead] = 0
    codes = torch.empty(out_dim, in_dim, dtype=torch.int8)
    for start in range(0, in_dim, BLOCK_COLUMNS):
        end = min(start + BLOCK_COLUMNS, in_dim)
        block, inverse = w[:, start:end].clone(), h_inv[start:end, start:end]
        errors = torch.empty_like(block)
        for i in range(end - start):
            column, scale = block[:, i], column_scales[:, start + i]
            code = torch.clamp(torch.round(column / scale), Q_MIN, Q_MAX)
            codes[:, start + i] = code.to(torch.int8)
            errors[:, i] = (column - code * scale) / inverse[i, i]
            block[:, i:] -= errors[:, i, None] * inverse[i, i:][None, :]
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return GroupQuantised(codes, scales, group_size)
