"""LoftQ (PEFT's `peft.utils.loftq_utils.loftq_init`) with bitsandbytes' quantisers written in plain torch.

PEFT 0.21.2 quantises with bitsandbytes on a CUDA/XPU device (`Params4bit(quant_type="nf4",
compress_statistics=False)`, blocksize 64; `Int8Params`, row-wise absmax of the float16 weight). funcpeft
reproduces bitsandbytes' own reference ("default" backend) arithmetic, so LoftQ runs anywhere, CPU included,
without bitsandbytes:

    NF4:  per block of 64 consecutive values (row-major, the last block may be shorter): absmax a,
          index = bucketize(clamp(x * (1/a), -1, 1), midpoints of NF4_CODE); dequantised: NF4_CODE[index] * a
    int8: per row of the float16 weight: absmax a, q = round(x * (127 / a)); dequantised: q * a * (1/127)
"""

from __future__ import annotations

import torch

# bitsandbytes' NF4 code (`get_4bit_type("nf4")`): QLoRA's normal-quantile levels, create_normal_map(0.9677083)
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default


def nf4_roundtrip(w: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> torch.Tensor:
    """`dequantize_4bit(quantize_4bit(w, nf4))` in float32, shape of `w` (any shape; blocks run over w.flatten())."""
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=w.device)
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    pieces = [flat[:full].reshape(-1, blocksize)] if full else []
    if full < n:
        pieces.append(flat[full:].reshape(1, -1))
    out = []
    bounds = (code[:-1] + code[1:]) / 2
    for blocks in pieces:
        absmax = blocks.abs().max(dim=-1).values
        if blocks.shape[1] == blocksize:
            scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1)
        else:  # bitsandbytes divides the short last block instead of multiplying by the reciprocal
            scaled = torch.clamp(blocks / absmax.clamp(min=1e-38).view(-1, 1), -1, 1)
        index = torch.bucketize(scaled, bounds, out_int32=True)
        out.append((code[index.long()] * absmax.view(-1, 1)).reshape(-1))
    return torch.cat(out).reshape(w.shape) if out else flat.reshape(w.shape)


def int8_roundtrip(w: torch.Tensor) -> torch.Tensor:
    """`int8_vectorwise_dequant(*int8_vectorwise_quant(w.half()))` in float32 (w: 2-D, one scale per row)."""
    half = w.to(torch.float16)
    row_stats = torch.max(half.abs(), dim=1).values.float()
    q = torch.round(half * (127.0 / row_stats.unsqueeze(-1))).to(torch.int8)
    return q * row_stats.view(-1, 1) * 7.874015718698502e-3


def _low_rank(weight: torch.Tensor, reduced_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's `_low_rank_decomposition`: L (out, r), R (r, in) with L @ R the rank-r SVD truncation."""
    if weight.dim() != 2:
        raise ValueError(f"Only support 2D matrix, but your input has {weight.dim()} dimensions.")
    U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
    L = U @ (torch.sqrt(torch.diag(S)[:, 0:reduced_rank]))
    R = torch.sqrt(torch.diag(S)[0:reduced_rank, :]) @ Vh
    return L, R


@torch.no_grad()
def loftq_init(
    weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's `loftq_init`: (dequantised weight in weight's dtype, lora_A (r, in), lora_B (out, r)).

    Alternates `num_iter` times: quantise the residual W - L R, then take the rank-r SVD of W - Q(.).
    weight: (out, in), any float dtype; computed in float32 on its device.
    """
    if num_bits not in (4, 8):
        raise ValueError("Only nf4 and int8 quantization is supported")
    if num_iter <= 0:
        raise ValueError("Number of iterations must be greater than 0")
    dtype = weight.dtype
    w = weight.to(torch.float32)
    res = w.clone()
    roundtrip = nf4_roundtrip if num_bits == 4 else int8_roundtrip
    for i in range(num_iter):
        dequantized = roundtrip(res)
        res = w - dequantized
        L, R = _low_rank(res, reduced_rank)
        if i + 1 == num_iter:
            break
        res = w - torch.mm(L, R)
    return dequantized.to(dtype), R, L
