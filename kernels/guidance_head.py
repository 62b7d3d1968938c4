"""The fused IGDS guidance head: J and d(sum J)/dz for a batch of encoder features.

Eager reference: `igds_fast.guidance.objective.igds_objective_and_grad` (same arguments, same results).
Shapes: z [B, d] (fp32, bf16 or fp16; every product accumulates in fp32), labels [B] (int32/int64),
W [C, d], b [C], log Q [C, d], group_ids [B] (None = labels). Outputs J [B] and dJ/dz [B, d], both
ALWAYS fp32 whatever z's dtype (the caller casts the gradient, as `IGDSGuidance` does).

    logits   = z W^T + b                 lse_c = logsumexp_c logits        p = exp(logits - lse_c)
    proto    = logits_y - lse_c          d/dz  = (onehot_y - p) W
    u        = z / tau                   lse_u = logsumexp_j u             log P = u - lse_u
    KL       = sum_j P_j (log P_j - log Q_yj)      d/dz = (1/tau) P (log P - log Q_y - KL)
    zhat     = z / max(|z|, 1e-12)       S = zhat zhat^T / tau, masked to same-group pairs
    N_i      = logsumexp_{j in G(i)} S_ij - S_ii
    d sum N / d zhat = (1/tau) (M zhat - 2 zhat),  M_ij = A_ij + A_ji,  A_ij = exp(S_ij - lse_i)
    d / dz   = (g - zhat <zhat, g>) / |z|,  <zhat_i, g_i> = (1/tau)(sum_j M_ij cos_ij - 2 |zhat_i|^2)
    J        = proto + beta KL - gamma N,   dJ/dz = sum of the three with the same weights

Three launches, none of which reads a value on the host (CUDA-graph safe):

  phase 1  grid (B/BB, C/BC + 1 + B/BB): everything that reads only z — logits tiles (a GEMM over
           d into a [B, C] fp32 scratch), one row-statistics program per row tile (lse_u and KL by an
           online (max, sum) pass over d with the log Q row gathered by label; |z|^2), and, when
           gamma != 0, the Gram tiles z z^T [B, B].
  phase 2  grid (B/BB): per row, lse_c over the logits scratch, the InfoNCE lse_i over the Gram row,
           and J.
  phase 3  grid (B/BB, d/BD): the gradient tile — (onehot - p) W as a GEMM over C from the logits
           scratch, the contextual term elementwise, and M zhat as a GEMM over the batch.

So z and W are each read twice (once per GEMM; the gradient needs p, which needs every logit of
its row first) and log Q rows twice; the scratch is B*C + B*B + 5B floats. A label outside [0, C)
cannot be checked without reading it on the host: its J and its gradient row come out NaN instead
(never an out-of-bounds read), which the sampler's finite-gradient check reports.
"""
from __future__ import annotations

import triton
import triton.language as tl

import torch

from igds_fast.errors import IGDSInputError
from igds_fast.head_contract import NORM_EPS, check_head_shapes

from ._common import check_out, next_pow2, on_device, scratch

# Rows of the [5, B] row-statistics scratch: lse of z/tau, KL, |z|^2, lse of the logits, InfoNCE lse.
LSE_U = tl.constexpr(0)
KL = tl.constexpr(1)
SUMSQ = tl.constexpr(2)
LSE_C = tl.constexpr(3)
LSE_DIV = tl.constexpr(4)
NUM_STATS = 5
# Finite "minus infinity" for running maxima: keeps (m_old - m_new) * 0 finite on empty rows.
NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _label_info(labels_ptr, rows, row_mask, C):
    label = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    valid = row_mask & (label >= 0) & (label < C)
    return label, valid, tl.where(valid, label, 0)


@triton.jit
def _logits_tile(z_ptr, w_ptr, b_ptr, logits_ptr, pid_b, pid_c, B, C, D,
                 BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    classes = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask, class_mask = rows < B, classes < C
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        z = tl.load(z_ptr + rows[:, None] * D + cols[None, :],
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        w_t = tl.load(w_ptr + classes[None, :] * D + cols[:, None],
                      mask=class_mask[None, :] & col_mask[:, None], other=0.0).to(tl.float32)
        acc = tl.dot(z, w_t, acc, input_precision=PRECISION)
    acc += tl.load(b_ptr + classes, mask=class_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(logits_ptr + rows[:, None] * C + classes[None, :], acc,
             mask=row_mask[:, None] & class_mask[None, :])


@triton.jit
def _row_stats(z_ptr, lq_ptr, labels_ptr, stats_ptr, pid_b, B, C, D, inv_tau,
               BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
               NEED_CTX: tl.constexpr, NEED_DIV: tl.constexpr):
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    _, _, safe_label = _label_info(labels_ptr, rows, row_mask, C)
    run_max = tl.full([BLOCK_B], NEG_BIG, tl.float32)
    run_sum = tl.zeros([BLOCK_B], tl.float32)
    # run_kl = sum_j exp(u_j - m) (u_j - m - log Q_yj): shifting by the running max keeps the
    # summands small, so KL = run_kl / run_sum - log run_sum does not cancel two large numbers.
    run_kl = tl.zeros([BLOCK_B], tl.float32)
    sumsq = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, D, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        z = tl.load(z_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_CTX:
            log_q = tl.load(lq_ptr + safe_label[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            u = z * inv_tau  # finite everywhere (masked z = 0); the mask enters through max and e
            new_max = tl.maximum(run_max, tl.max(tl.where(mask, u, float("-inf")), axis=1))
            alpha = tl.exp(run_max - new_max)
            shifted = tl.where(mask, u - new_max[:, None], 0.0)  # <= 0 on real entries
            e = tl.where(mask, tl.exp(shifted), 0.0)
            run_kl = alpha * (run_kl + run_sum * (run_max - new_max)) + tl.sum(e * (shifted - log_q), axis=1)
            run_sum = alpha * run_sum + tl.sum(e, axis=1)
            run_max = new_max
        if NEED_DIV:
            sumsq += tl.sum(z * z, axis=1)
    if NEED_CTX:
        run_sum = tl.where(row_mask, run_sum, 1.0)  # rows past B: keep the unused math finite
        log_sum = tl.log(run_sum)
        tl.store(stats_ptr + LSE_U * B + rows, run_max + log_sum, mask=row_mask)
        tl.store(stats_ptr + KL * B + rows, run_kl / run_sum - log_sum, mask=row_mask)
    if NEED_DIV:
        tl.store(stats_ptr + SUMSQ * B + rows, sumsq, mask=row_mask)


@triton.jit
def _gram_tile(z_ptr, gram_ptr, pid_b, pid_j, B, D,
               BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    others = pid_j * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask, other_mask = rows < B, others < B
    acc = tl.zeros([BLOCK_B, BLOCK_B], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        zi = tl.load(z_ptr + rows[:, None] * D + cols[None, :],
                     mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        zj_t = tl.load(z_ptr + others[None, :] * D + cols[:, None],
                       mask=other_mask[None, :] & col_mask[:, None], other=0.0).to(tl.float32)
        acc = tl.dot(zi, zj_t, acc, input_precision=PRECISION)
    tl.store(gram_ptr + rows[:, None] * B + others[None, :], acc,
             mask=row_mask[:, None] & other_mask[None, :])


@triton.jit
def _head_phase1_kernel(z_ptr, w_ptr, b_ptr, lq_ptr, labels_ptr, logits_ptr, stats_ptr, gram_ptr,
                        B, C, D, num_class_tiles, inv_tau,
                        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                        NEED_CTX: tl.constexpr, NEED_DIV: tl.constexpr, PRECISION: tl.constexpr):
    # Axis 1 enumerates [class tiles | one row-statistics program | Gram column tiles].
    pid_b = tl.program_id(0)
    pid = tl.program_id(1)
    if pid < num_class_tiles:
        _logits_tile(z_ptr, w_ptr, b_ptr, logits_ptr, pid_b, pid, B, C, D,
                     BLOCK_B, BLOCK_C, BLOCK_D, PRECISION)
    elif pid == num_class_tiles:
        _row_stats(z_ptr, lq_ptr, labels_ptr, stats_ptr, pid_b, B, C, D, inv_tau,
                   BLOCK_B, BLOCK_D, NEED_CTX, NEED_DIV)
    else:
        _gram_tile(z_ptr, gram_ptr, pid_b, pid - num_class_tiles - 1, B, D, BLOCK_B, BLOCK_D, PRECISION)


@triton.jit
def _head_rows_kernel(logits_ptr, labels_ptr, groups_ptr, stats_ptr, gram_ptr, objective_ptr,
                      B, C, beta, gamma, inv_tau, norm_eps,
                      BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                      NEED_CTX: tl.constexpr, NEED_DIV: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    _, valid, safe_label = _label_info(labels_ptr, rows, row_mask, C)
    run_max = tl.full([BLOCK_B], NEG_BIG, tl.float32)
    run_sum = tl.zeros([BLOCK_B], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        classes = c0 + tl.arange(0, BLOCK_C)
        logits = tl.load(logits_ptr + rows[:, None] * C + classes[None, :],
                         mask=row_mask[:, None] & (classes < C)[None, :], other=float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        run_max = new_max
    lse_c = run_max + tl.log(tl.where(row_mask, run_sum, 1.0))
    tl.store(stats_ptr + LSE_C * B + rows, lse_c, mask=row_mask)
    objective = tl.load(logits_ptr + rows * C + safe_label, mask=row_mask, other=0.0) - lse_c
    if NEED_CTX:
        objective += beta * tl.load(stats_ptr + KL * B + rows, mask=row_mask, other=0.0)
    if NEED_DIV:
        group = tl.load(groups_ptr + rows, mask=row_mask, other=0)
        sumsq = tl.load(stats_ptr + SUMSQ * B + rows, mask=row_mask, other=1.0)
        norm = tl.maximum(tl.sqrt(sumsq), norm_eps)
        div_max = tl.full([BLOCK_B], NEG_BIG, tl.float32)
        div_sum = tl.zeros([BLOCK_B], tl.float32)
        for j0 in range(0, B, BLOCK_B):
            others = j0 + tl.arange(0, BLOCK_B)
            other_mask = others < B
            other_norm = tl.maximum(tl.sqrt(tl.load(stats_ptr + SUMSQ * B + others, mask=other_mask, other=1.0)), norm_eps)
            other_group = tl.load(groups_ptr + others, mask=other_mask, other=0)
            same = (group[:, None] == other_group[None, :]) & other_mask[None, :] & row_mask[:, None]
            gram = tl.load(gram_ptr + rows[:, None] * B + others[None, :], mask=same, other=0.0)
            sim = tl.where(same, gram / (norm[:, None] * other_norm[None, :]) * inv_tau, float("-inf"))
            new_max = tl.maximum(div_max, tl.max(sim, axis=1))
            div_sum = div_sum * tl.exp(div_max - new_max) + tl.sum(tl.exp(sim - new_max[:, None]), axis=1)
            div_max = new_max
        lse_div = div_max + tl.log(tl.where(row_mask, div_sum, 1.0))
        tl.store(stats_ptr + LSE_DIV * B + rows, lse_div, mask=row_mask)
        self_sim = sumsq / (norm * norm) * inv_tau
        objective -= gamma * (lse_div - self_sim)
    objective = tl.where(valid, objective, float("nan"))
    tl.store(objective_ptr + rows, objective, mask=row_mask)


@triton.jit
def _head_grad_kernel(z_ptr, w_ptr, lq_ptr, labels_ptr, groups_ptr, logits_ptr, stats_ptr, gram_ptr,
                      grad_ptr, B, C, D, beta, gamma, inv_tau, norm_eps,
                      BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                      NEED_CTX: tl.constexpr, NEED_DIV: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask, col_mask = rows < B, cols < D
    tile_mask = row_mask[:, None] & col_mask[None, :]
    label, valid, safe_label = _label_info(labels_ptr, rows, row_mask, C)

    # Prototype term: (onehot - p) W, a GEMM over the classes from the logits scratch.
    lse_c = tl.load(stats_ptr + LSE_C * B + rows, mask=row_mask, other=0.0)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        classes = c0 + tl.arange(0, BLOCK_C)
        class_mask = classes < C
        pair_mask = row_mask[:, None] & class_mask[None, :]
        logits = tl.load(logits_ptr + rows[:, None] * C + classes[None, :], mask=pair_mask, other=0.0)
        residual = tl.where(classes[None, :] == label[:, None], 1.0, 0.0) - tl.exp(logits - lse_c[:, None])
        residual = tl.where(pair_mask, residual, 0.0)
        w = tl.load(w_ptr + classes[:, None] * D + cols[None, :],
                    mask=class_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(residual, w, acc, input_precision=PRECISION)

    if NEED_CTX or NEED_DIV:
        z = tl.load(z_ptr + rows[:, None] * D + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    if NEED_CTX:
        lse_u = tl.load(stats_ptr + LSE_U * B + rows, mask=row_mask, other=0.0)
        kl = tl.load(stats_ptr + KL * B + rows, mask=row_mask, other=0.0)
        log_q = tl.load(lq_ptr + safe_label[:, None] * D + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        log_p = z * inv_tau - lse_u[:, None]
        acc += (beta * inv_tau) * tl.exp(log_p) * (log_p - log_q - kl[:, None])
    if NEED_DIV:
        group = tl.load(groups_ptr + rows, mask=row_mask, other=0)
        sumsq = tl.load(stats_ptr + SUMSQ * B + rows, mask=row_mask, other=1.0)
        norm = tl.maximum(tl.sqrt(sumsq), norm_eps)
        lse_i = tl.load(stats_ptr + LSE_DIV * B + rows, mask=row_mask, other=0.0)
        mixed = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)  # sum_j M_ij zhat_j
        row_dot = tl.zeros([BLOCK_B], tl.float32)               # sum_j M_ij <zhat_i, zhat_j>
        for j0 in range(0, B, BLOCK_B):
            others = j0 + tl.arange(0, BLOCK_B)
            other_mask = others < B
            other_group = tl.load(groups_ptr + others, mask=other_mask, other=0)
            other_norm = tl.maximum(tl.sqrt(tl.load(stats_ptr + SUMSQ * B + others, mask=other_mask, other=1.0)), norm_eps)
            lse_j = tl.load(stats_ptr + LSE_DIV * B + others, mask=other_mask, other=0.0)
            same = (group[:, None] == other_group[None, :]) & other_mask[None, :] & row_mask[:, None]
            gram = tl.load(gram_ptr + rows[:, None] * B + others[None, :], mask=same, other=0.0)
            cosine = gram / (norm[:, None] * other_norm[None, :])
            sim = cosine * inv_tau
            # A_ij + A_ji with A_ji = exp(S_ji - lse_j) and S symmetric: no transpose needed.
            m = tl.where(same, tl.exp(sim - lse_i[:, None]) + tl.exp(sim - lse_j[None, :]), 0.0)
            z_j = tl.load(z_ptr + others[:, None] * D + cols[None, :],
                          mask=other_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            mixed = tl.dot(m / other_norm[None, :], z_j, mixed, input_precision=PRECISION)
            row_dot += tl.sum(m * cosine, axis=1)
        zhat = z / norm[:, None]
        grad_zhat = (mixed - 2.0 * zhat) * inv_tau
        projection = (row_dot - 2.0 * sumsq / (norm * norm)) * inv_tau  # <zhat_i, grad_zhat_i>
        acc -= gamma * (grad_zhat - zhat * projection[:, None]) / norm[:, None]
    acc = tl.where(valid[:, None], acc, float("nan"))
    tl.store(grad_ptr + rows[:, None] * D + cols[None, :], acc, mask=tile_mask)


def _scalar(value, name: str) -> float:
    # A tensor here would need .item() (a host sync): the head takes Python numbers only.
    if torch.is_tensor(value) or not isinstance(value, (int, float)):
        raise IGDSInputError(f"{name} must be a Python float, got {type(value).__name__}")
    return float(value)


def head_block_sizes(batch: int, classes: int, dim: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_C, BLOCK_D): fixed shape heuristics (no autotuning: it would run
    benchmarks inside a CUDA-graph capture). tl.dot needs every block >= 16."""
    # 16-row tiles up to B = 64 give the logits GEMM enough programs to fill the GPU at C = 1000.
    block_b = 16 if batch <= 64 else 32
    block_c = min(64, max(16, next_pow2(classes)))
    block_d = min(64, max(16, next_pow2(dim)))
    return block_b, block_c, block_d


def guidance_head(
    z,
    labels,
    weight,
    bias,
    log_centroids,
    beta: float,
    tau: float,
    gamma: float = 0.0,
    group_ids=None,
    *,
    out=None,
    precision: str = "ieee",
):
    """(J [B] fp32, d(sum_i J_i)/dz [B, d] fp32) — `igds_objective_and_grad` in three Triton launches.

    z: [B, d] fp32/bf16/fp16; labels: [B] int in [0, C) (an out-of-range label gives a NaN row);
    weight [C, d], bias [C], log_centroids [C, d]; beta, tau, gamma: Python floats;
    group_ids: [B] integer ids of the diversity groups (None = labels).
    out: optional (objective [B], grad [B, d]) preallocated contiguous fp32 buffers to write.
    precision: tl.dot input precision, "ieee" (exact fp32, the default: matches the eager head)
        or "tf32" (faster tensor-core GEMMs, ~1e-3 relative error in the logits).
    No host synchronisation: capturable in a CUDA graph.
    """
    check_head_shapes(z, labels, weight, bias, log_centroids, group_ids)
    beta, tau, gamma = _scalar(beta, "beta"), _scalar(tau, "tau"), _scalar(gamma, "gamma")
    if not tau > 0:
        raise IGDSInputError(f"tau must be positive, got {tau}")
    if precision not in ("ieee", "tf32"):
        raise IGDSInputError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    batch, dim = z.shape
    classes = weight.shape[0]
    device = z.device
    objective_out, grad_out = (None, None) if out is None else out
    objective = check_out(objective_out, (batch,), torch.float32, device, "out[0]")
    grad = check_out(grad_out, (batch, dim), torch.float32, device, "out[1]")
    if batch == 0:
        return objective, grad

    z, weight, bias, log_centroids = (t.contiguous() for t in (z, weight, bias, log_centroids))
    labels = labels.contiguous()
    groups = labels if group_ids is None else group_ids.contiguous()
    need_ctx, need_div = beta != 0.0, gamma != 0.0
    block_b, block_c, block_d = head_block_sizes(batch, classes, dim)
    row_tiles = triton.cdiv(batch, block_b)
    class_tiles = triton.cdiv(classes, block_c)

    logits = scratch((batch, classes), device)
    stats = scratch((NUM_STATS, batch), device)
    gram = scratch((batch, batch), device) if need_div else logits  # placeholder: never read
    inv_tau = 1.0 / tau
    extra = (1 if (need_ctx or need_div) else 0) + (row_tiles if need_div else 0)
    with on_device(device):
        _head_phase1_kernel[(row_tiles, class_tiles + extra)](
            z, weight, bias, log_centroids, labels, logits, stats, gram,
            batch, classes, dim, class_tiles, inv_tau,
            BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_D=block_d,
            NEED_CTX=need_ctx, NEED_DIV=need_div, PRECISION=precision,
        )
        _head_rows_kernel[(row_tiles,)](
            logits, labels, groups, stats, gram, objective,
            batch, classes, beta, gamma, inv_tau, NORM_EPS,
            BLOCK_B=block_b, BLOCK_C=block_c, NEED_CTX=need_ctx, NEED_DIV=need_div,
        )
        _head_grad_kernel[(row_tiles, triton.cdiv(dim, block_d))](
            z, weight, log_centroids, labels, groups, logits, stats, gram, grad,
            batch, classes, dim, beta, gamma, inv_tau, NORM_EPS,
            BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_D=block_d,
            NEED_CTX=need_ctx, NEED_DIV=need_div, PRECISION=precision,
        )
    return objective, grad
