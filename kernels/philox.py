"""Counter-based per-image Gaussian noise (Philox4x32-10 + Box-Muller), in-kernel and standalone.

Eager reference of the interface: `igds_fast.seeding.seeded_normal` (same signature, same contract:
row b depends only on (seeds[b], stream), never on the batch). The numbers themselves are a
different stream from torch's generators; `philox_normal` is the reference of the noise that the
fused DDPM update (`kernels/ddpm_update.py`) draws in-kernel, and this is how it is defined, so any
other implementation (CUDA, C++, numpy — see tests/test_kernels_philox.py) can reproduce it bit for
bit up to the float rounding of log/sqrt/cos/sin:

    row b with seed s_b (64 bits; a negative int64 is its two's-complement bit pattern),
    stream t (respaced step index i >= 0, or -1 for x_T), flat element index e in [0, numel(shape)):

    key     = (s_b mod 2^32, floor(s_b / 2^32) mod 2^32)                  (k0, k1)
    counter = (floor(e / 4), t mod 2^32, 0, 0)                            (c0, c1, c2, c3)
    r0..r3  = Philox4x32 with 10 rounds (Salmon et al. 2011; triton.language.philox)
    u_k     = triton's uint_to_uniform_float(r_k)  in [0, 1)
    (n0, n1) = BoxMuller(u0, u1),  (n2, n3) = BoxMuller(u2, u3)
              BoxMuller(a, b) = sqrt(-2 log max(a, 1e-7)) * (cos 2 pi b, sin 2 pi b)
    noise[b, e] = n_{e mod 4}

One Philox call yields four normals, so the generator costs a quarter of a Philox evaluation and half
a Box-Muller per element. Any BLOCK that is a multiple of 4 gives the same numbers.
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

from ._common import check_out, next_pow2, on_device, seeds_to_tensor


@triton.jit
def philox_normal_block(seed, stream, start, BLOCK: tl.constexpr):
    """Standard normals for elements start .. start + BLOCK - 1 of the row keyed by (seed, stream).

    seed: int64 scalar (the Philox key); stream: integer scalar (taken mod 2^32);
    start: a multiple of 4. Returns fp32 [BLOCK].
    """
    quarter: tl.constexpr = BLOCK // 4
    c0 = (start // 4 + tl.arange(0, quarter)).to(tl.uint32)
    zero = c0 * 0
    # stream is an int64 scalar loaded from memory or a Python int the JIT specialised as a constant;
    # widening through a vector works for both (tl.to_tensor, the direct way, is not in Triton 3.6).
    c1 = ((zero.to(tl.int64) + stream) & 0xFFFFFFFF).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r2), tl.uint_to_uniform_float(r3))
    # interleave(interleave(n0, n2), interleave(n1, n3)) puts n_j at position 4k + j.
    return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))


@triton.jit
def _philox_normal_kernel(out_ptr, seeds_ptr, stream, numel, BLOCK: tl.constexpr):
    # grid (cdiv(numel, BLOCK), B): one image row per grid column, so a row never sees its batch.
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    seed = tl.load(seeds_ptr + row)
    start = pid * BLOCK
    offsets = start + tl.arange(0, BLOCK)
    noise = philox_normal_block(seed, stream, start, BLOCK)
    tl.store(out_ptr + row * numel + offsets, noise.to(out_ptr.dtype.element_ty), mask=offsets < numel)


def noise_block_size(numel: int) -> int:
    """Elements per program of every Philox-drawing kernel (a power of two >= 4)."""
    return max(4, min(1024, next_pow2(numel)))


def philox_normal(seeds, stream: int, shape, device, dtype=torch.float32, *, out=None) -> torch.Tensor:
    """Standard normal noise [B, *shape]; row b keyed by (seeds[b], stream) (module docstring).

    Same signature as `igds_fast.seeding.seeded_normal`. seeds: a sequence of Python ints or an
    integer tensor [B] (moved to `device` if needed: pass a device tensor built once per batch to
    avoid a copy per call); stream: the respaced step index i >= 0, or
    `igds_fast.seeding.INITIAL_NOISE_STREAM` (-1) for x_T. dtype: output dtype (drawn in fp32).
    out: optional preallocated contiguous [B, *shape] tensor of `dtype` to write into.
    Exactly the noise `fused_ddpm_update` adds at step `stream` for images of that shape.
    """
    device = torch.device(device)
    seed_tensor = seeds_to_tensor(seeds, device)
    shape = tuple(int(s) for s in shape)
    batch = seed_tensor.shape[0]
    numel = 1
    for size in shape:
        numel *= size
    result = check_out(out, (batch, *shape), dtype, device, "out")
    if numel == 0:
        return result
    block = noise_block_size(numel)
    with on_device(device):
        _philox_normal_kernel[(triton.cdiv(numel, block), batch)](
            result, seed_tensor, int(stream), numel, BLOCK=block
        )
    return result
