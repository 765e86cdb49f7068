"""Representativeness and diversity losses of the memory method, and the soft-label (knowledge distillation)
loss of the evaluation. Pure functions of tensors.

For each class c in the batch whose generated memory is non-empty (X_c = the batch's x̂0 rows of class c):
    R_c = 1 − min_{i∈c, j} cos(X_c,i, M_r[c]_j)      pull the least similar pair toward the real memory
    D_c = max_{i∈c, j} cos(X_c,i, M_g[c]_j)           push the most similar pair away from earlier samples
    a_c = (λ_r R_c + λ_g D_c) / K                    K = number of distinct classes in the batch

Two implementations of the same terms: `memory_loss` / `memory_loss_terms` are the public reference of the
spec (a loop over classes; banks as lists or dicts of [n, D] tensors; METHOD.md), and
`memory_loss_terms_dense` is the batched path training uses (banks as padded [C, N, D] tensors, no Python
loop over classes). Tests hold the two equal in value and gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from diffdistill.memory import class_slots, cosine_matrix, unit_rows

Banks = Sequence[Tensor] | Mapping[int, Tensor]


def _bank(banks: Banks, c: int) -> Tensor | None:
    if isinstance(banks, Mapping):
        return banks.get(c)
    return banks[c]


def memory_loss_terms(
    x0: Tensor, labels: Tensor, real: Banks, gen: Banks
) -> tuple[list[int], Tensor, Tensor]:
    """Per-class (R_c, D_c) for every class in the batch, in ascending class order.

    x0: [B, D] (or [B, ...], flattened); labels: [B]. Returns (classes, R [K], D [K]); a class with an
    empty generated memory gets R_c = D_c = 0 (it still counts in K).
    """
    x0 = x0.flatten(1)
    classes = torch.unique(labels).tolist()
    zero = x0.new_zeros(())
    if not classes:
        return [], x0.new_zeros(0), x0.new_zeros(0)
    reps, divs = [], []
    for c in classes:
        g = _bank(gen, c)
        if g is None or g.shape[0] == 0:
            reps.append(zero)
            divs.append(zero)
            continue
        xc = x0[labels == c]  # [B_c, D]
        r = _bank(real, c)
        reps.append(1 - cosine_matrix(xc, r.to(xc.dtype)).min() if r is not None and r.shape[0] else zero)
        divs.append(cosine_matrix(xc, g.to(xc.dtype)).max())
    return classes, torch.stack(reps), torch.stack(divs)


def memory_loss_terms_dense(x0: Tensor, labels: Tensor, real: Tensor, real_counts: Tensor, gen: Tensor,
                            gen_counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`memory_loss_terms` for banks held as padded tensors [C, N, D] with row counts [C] (a class's rows
    first): every class of the batch at once, with no Python loop over classes and no host synchronization.
    Returns (classes [S], R [S], D [S]) over S = min(B, C) fixed slots: the batch's classes ascending, then
    unused slots (class -1, R = D = 0)."""
    x0 = unit_rows(x0.flatten(1))  # [B, D]
    b = x0.shape[0]
    classes, inv, _ = class_slots(labels, min(b, real.shape[0]))  # [S], [B]
    present = classes >= 0
    own = classes.clamp_min(0)  # [S] (unused slots read class 0, then count for nothing)
    rows = torch.arange(b, device=x0.device)

    def sims(bank: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        unit = unit_rows(bank[own].to(x0.dtype))  # [S, N, D] the batch's classes' banks
        mine = (unit @ x0.T)[inv, :, rows]  # [B, N] each sample vs its class's bank
        valid = torch.arange(bank.shape[1], device=x0.device)[None] < counts.to(x0.device)[labels][:, None]
        return mine, valid

    real_sim, real_ok = sims(real, real_counts)
    gen_sim, gen_ok = sims(gen, gen_counts)
    least = torch.where(real_ok, real_sim, torch.inf).amin(1)  # [B] each sample's least similar real row
    most = torch.where(gen_ok, gen_sim, -torch.inf).amax(1)  # [B] each sample's most similar generated row
    least = x0.new_zeros(len(classes)).scatter_reduce(0, inv, least, "amin", include_self=False)  # [S]
    most = x0.new_zeros(len(classes)).scatter_reduce(0, inv, most, "amax", include_self=False)
    has_gen = present & (gen_counts.to(x0.device)[own] > 0)
    has_real = real_counts.to(x0.device)[own] > 0
    reps = torch.where(has_gen & has_real, 1 - least, 0.0)
    divs = torch.where(has_gen, most, 0.0)
    return classes, reps, divs


def memory_loss_dense(x0: Tensor, labels: Tensor, real: Tensor, real_counts: Tensor, gen: Tensor,
                      gen_counts: Tensor, lambda_real: float, lambda_gen: float,
                      accumulation: str = "per_class") -> tuple[Tensor, Tensor, Tensor]:
    """The training step's memory loss from padded banks (`memory_loss_terms_dense`, `combine_terms`), and the
    mean R_c and D_c over the batch's K classes for the log: (loss, R mean, D mean), all without reading K back
    (one function, so that `compile: true` makes one graph of it)."""
    classes, reps, divs = memory_loss_terms_dense(x0, labels, real, real_counts, gen, gen_counts)  # [S] slots
    present = classes >= 0
    k = present.sum()
    return combine_terms(reps, divs, lambda_real, lambda_gen, accumulation, present), reps.sum() / k, divs.sum() / k


def memory_loss(
    x0: Tensor,
    labels: Tensor,
    real: Banks,
    gen: Banks,
    lambda_real: float,
    lambda_gen: float,
    accumulation: str = "per_class",
) -> Tensor:
    """Σ_c a_c (scalar, differentiable w.r.t. x0); see `combine_terms` for `accumulation`."""
    _, reps, divs = memory_loss_terms(x0, labels, real, gen)
    return combine_terms(reps, divs, lambda_real, lambda_gen, accumulation)


def combine_terms(reps: Tensor, divs: Tensor, lambda_real: float, lambda_gen: float,
                  accumulation: str = "per_class", present: Tensor | None = None) -> Tensor:
    """Σ_c (λ_r R_c + λ_g D_c) / K over the K classes of the batch.

    `present` [S] (optional): which entries are classes of the batch, the first K of them (the slots of
    `memory_loss_terms_dense`); without it every entry is. accumulation="authors" reproduces the released
    code, which adds the running sum inside the class loop: the class visited first (smallest id) counts K
    times, the next K−1 times, and so on.
    """
    if accumulation not in ("per_class", "authors"):
        raise ValueError(f"memory loss accumulation {accumulation!r}: expected 'per_class' or 'authors'")
    if present is None:
        present = torch.ones(reps.shape, dtype=torch.bool, device=reps.device)
    if reps.shape[0] == 0:
        return reps.new_zeros(())
    k = present.sum()  # a tensor: K is never read back to the host
    per_class = torch.where(present, (lambda_real * reps + lambda_gen * divs) / k, 0.0)  # [S]
    if accumulation == "authors":  # K, K-1, ..., 1 over the present entries (they come first)
        per_class = per_class * (k - torch.arange(reps.shape[0], device=reps.device)).clamp_min(0)
    return per_class.sum()


def soft_targets(teacher_logits: Tensor, temperature: float) -> Tensor:
    """[B, K] the teacher's probabilities at `temperature`: softmax(logits / T)."""
    return F.softmax(teacher_logits.float() / temperature, dim=1)


def soft_label_loss(student_logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """KL(targets ‖ softmax(student / T)) summed over classes, averaged over the batch (PyTorch's KLDivLoss with
    reduction "batchmean", as RDED and SRe²L use it; no T² factor). targets [B, K] are probabilities (0 log 0
    = 0); with T = 1 and one-hot targets this is the cross-entropy."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=1)
    return (torch.xlogy(targets, targets) - targets * log_q).sum(1).mean()
