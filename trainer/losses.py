"""Training losses of the aligned space: contrastive InfoNCE, alignment and distillation.

Every loss returns a dict of named terms plus `"loss"`, their sum (open_clip's
`DistillClipLoss` does the same), so a trainer can log each term and back-propagate the total.
All similarities are cosines: inputs are L2-normalized here, so a head whose output is not yet
normalized gets the same loss the normalized deployed vectors would.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

NORM_EPS = 1e-12  # keeps an all-zero row finite when normalizing


def _normalize(x: Tensor) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"expected an (n, d) batch, got shape {tuple(x.shape)}")
    return F.normalize(x, dim=-1, eps=NORM_EPS)


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"paired batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def duplicate_mask(group_ids: Tensor | list[Any], n: int, *, device: torch.device) -> Tensor:
    """`(n, n)` bool: True where rows i != j share a group id (both are positives of each other).

    `group_ids` is one id per row (a tensor, or any hashables such as image paths), e.g. the
    image of each caption in the batch, so that several captions of one image do not count as
    negatives for each other's image.
    """
    if isinstance(group_ids, Tensor):
        ids = group_ids.to(device)
    else:  # any hashable ids (ints, paths, strings) become small ints
        index: dict[Any, int] = {}
        ids = torch.tensor([index.setdefault(g, len(index)) for g in group_ids], device=device)
    if ids.shape != (n,):
        raise ValueError(f"group_ids needs one id per row ({n}), got shape {tuple(ids.shape)}")
    same = ids[:, None] == ids[None, :]
    return same & ~torch.eye(n, dtype=torch.bool, device=device)


def info_nce(
    a: Tensor,
    b: Tensor,
    *,
    temperature: float | Tensor,
    group_ids: Tensor | list[Any] | None = None,
) -> dict[str, Tensor]:
    """Symmetric InfoNCE between paired `(n, d)` batches: row i of `a` goes with row i of `b`.

    Logits are cosine similarities divided by `temperature` (a float, or a tensor for a learned
    temperature). The loss is the mean of the a→b and b→a cross-entropies, each averaged over
    rows. With `group_ids`, in-batch duplicates are **masked out of the denominator**: for row
    i, every column j != i with the same group id (another caption of the same image, the same
    image twice) is removed from the softmax, so it is neither a negative nor a second positive.
    Returns `{"contrastive_loss": L, "loss": L}` as 0-d tensors.
    """
    _check_pair(a, b)
    logits = _normalize(a) @ _normalize(b).T / temperature
    if group_ids is not None:
        mask = duplicate_mask(group_ids, logits.shape[0], device=logits.device)
        logits = logits.masked_fill(mask, float("-inf"))
    targets = torch.arange(logits.shape[0], device=logits.device)
    # the mask is symmetric, so the transposed logits are masked the same way
    loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    return {"contrastive_loss": loss, "loss": loss}


def similarity_distributions(
    f_s: Tensor, f_t: Tensor, *, temperature: float | Tensor
) -> tuple[Tensor, Tensor]:
    """Row-softmax similarity distributions over the batch, `(n, n)` each.

    `p_s[i] = softmax_j(cos(s_i, t_j) / τ)`: where the student's item i lands among the batch's
    teacher vectors. `p_t[i] = softmax_j(cos(t_i, t_j) / τ)`: the same, had the student matched
    the teacher exactly. Comparing the two asks the student to reproduce the teacher's
    neighbourhood structure, not only its own target point.
    """
    s, t = _normalize(f_s), _normalize(f_t)
    p_s = torch.softmax(s @ t.T / temperature, dim=-1)
    p_t = torch.softmax(t @ t.T / temperature, dim=-1)
    return p_s, p_t


def alignment_loss(
    f_s: Tensor, f_t: Tensor, *, lam: float, temperature: float | Tensor
) -> dict[str, Tensor]:
    """`L_align = mean_i ‖s_i − t_i‖² + λ · mean_i KL(p_s[i] ‖ p_t[i])` on `(n, d)` batches.

    `s`, `t` are the L2-normalized rows of `f_s` (student) and `f_t` (teacher), so the first
    term is `2 − 2·cos`. `p_s`, `p_t` are from `similarity_distributions`. The KL is taken in the
    direction DESIGN.md writes, KL(p_s ‖ p_t) = Σ_j p_s log(p_s / p_t). Gradients reach whichever
    input requires them; detach a teacher that should stay fixed (`DistillLoss` does).
    Returns `{"align_mse_loss": …, "align_kl_loss": λ·KL, "loss": their sum}`.
    """
    _check_pair(f_s, f_t)
    s, t = _normalize(f_s), _normalize(f_t)
    mse = (s - t).pow(2).sum(dim=-1).mean()
    s_logits = s @ t.T / temperature
    t_logits = t @ t.T / temperature
    log_p_s = F.log_softmax(s_logits, dim=-1)
    log_p_t = F.log_softmax(t_logits, dim=-1)
    kl = (log_p_s.exp() * (log_p_s - log_p_t)).sum(dim=-1).mean()
    kl_term = lam * kl
    return {"align_mse_loss": mse, "align_kl_loss": kl_term, "loss": mse + kl_term}


class DistillLoss(nn.Module):
    """`L = α·L_contrastive + β·L_KD`: a student distilled from a frozen teacher.

    `L_contrastive` is `info_nce(student, teacher)`; `L_KD` is `alignment_loss(student, teacher)`
    (‖s − t‖² + λ·KL). The teacher side never receives gradients: given embeddings are detached;
    a teacher module passed at construction runs under `torch.no_grad()`, has
    `requires_grad=False` on its parameters and is kept in eval mode (re-set before each call,
    since another owner may have flipped it to train). The teacher is not registered as a
    submodule, so it is not in this module's `state_dict()` or `parameters()`, and
    `DistillLoss.train()` leaves it in eval; moving it to a device is its owner's job.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        temperature: float = 0.05,
        lam: float = 1.0,
        *,
        teacher: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.alpha = alpha  # weight of the contrastive term
        self.beta = beta  # weight of the distillation (alignment) term
        self.temperature = temperature  # τ of both the InfoNCE logits and the KD softmaxes
        self.lam = lam  # λ, weight of the KL inside the alignment term
        # a tuple hides the module from nn.Module's registration (state_dict, .train(), .to())
        self._teacher: tuple[nn.Module, ...] = ()
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
            self._teacher = (teacher,)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def teacher_embeddings(self, teacher_input: Any) -> Tensor:
        """Teacher vectors for `teacher_input`: run the frozen teacher, or detach given vectors."""
        teacher = self.teacher
        if teacher is None:
            if not isinstance(teacher_input, Tensor):
                raise TypeError(
                    "without a teacher module, pass the teacher's embeddings as a tensor"
                )
            return teacher_input.detach()
        if teacher.training:
            log.debug("teacher was put in train mode; switching it back to eval")
            teacher.eval()
        with torch.no_grad():
            if isinstance(teacher_input, Mapping):
                return teacher(**teacher_input)
            return teacher(teacher_input)

    def forward(
        self,
        student: Tensor,
        teacher_input: Any,
        *,
        group_ids: Tensor | list[Any] | None = None,
    ) -> dict[str, Tensor]:
        """Loss terms for `(n, d)` student vectors and their teacher targets.

        `teacher_input` is the teacher's `(n, d)` embeddings when no teacher module was given,
        else the module's input (a tensor, or a mapping passed as keyword arguments).
        `group_ids` masks in-batch duplicates in the contrastive term (see `info_nce`).
        Returns `{"contrastive_loss": α·L_c, "distill_loss": β·L_KD, "loss": their sum}`.
        """
        target = self.teacher_embeddings(teacher_input)
        contrastive = info_nce(student, target, temperature=self.temperature, group_ids=group_ids)
        align = alignment_loss(student, target, lam=self.lam, temperature=self.temperature)
        c_term = self.alpha * contrastive["loss"]
        d_term = self.beta * align["loss"]
        return {"contrastive_loss": c_term, "distill_loss": d_term, "loss": c_term + d_term}
