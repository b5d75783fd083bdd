"""Task affinity from concurrently easy or difficult examples (Lu et al. 2017, Sec. 3.3).

For task ``i`` and example ``n`` the error margin is ``m_ni = |t_ni - s_ni|`` (label minus sigmoid score;
for a multi-class task ``1 - p(true class)``, for a multilabel task treated as one task the mean margin of
its known labels). Example ``n`` is *difficult* for task ``i`` when ``e_ni = 1[m_ni >= E{m_i}]``, and the
affinity of two tasks is the probability that an example is concurrently easy or difficult for both
(eq. 6)::

    A(i, j) = P(e_i = 1, e_j = 1) + P(e_i = 0, e_j = 0) = E{e_i e_j + (1 - e_i)(1 - e_j)}.

Every expectation is estimated online from the training mini-batches (no extra forward pass): a weighted
average of the within-batch averages, the batch ``k`` steps ago weighted by ``decay ** k`` (the paper's
"error decay factor", 0.99). The pair average of a batch uses the examples labelled for both tasks; a pair
never labelled on one example (tasks of different input domains, or masked attributes) has no joint
observation, and gets the option ``unpaired_affinity``: by default 0 (no evidence that the two are easy
or difficult together, so they are not grouped for it), or ``"independent"``: the value the two
marginals give under independence, ``q_i q_j + (1 - q_i)(1 - q_j)`` with ``q_i = P(e_i = 1)`` — which is
high whenever both tasks are mostly easy, whatever their relation. The diagonal is exactly 1.

Branch affinity (eqs. 7-8): for branches ``k`` and ``l`` holding task sets ``I_k`` and ``J_l``,
``Ã(k, l) = mean_{i in I_k} min_{j in J_l} A(i, j)``, ``Ã(l, k)`` the same with the roles swapped and
``A_b(k, l) = (Ã(k, l) + Ã(l, k)) / 2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class AffinityEstimator(nn.Module):
    """The online estimate of eq. 6 for ``num_tasks`` tasks, in buffers (checkpointed with the model).

    Call :meth:`update` once per task group of a mini-batch with that batch's margins and label masks
    (tasks of one input domain see the same examples), then read :meth:`matrix`.
    """

    def __init__(self, num_tasks: int, decay: float = 0.99) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.decay = float(decay)
        t = num_tasks
        self.register_buffer("margin_sum", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("margin_weight", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("hard_sum", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("hard_weight", torch.zeros(t, dtype=torch.float64))
        self.register_buffer("pair_sum", torch.zeros(t, t, dtype=torch.float64))
        self.register_buffer("pair_weight", torch.zeros(t, t, dtype=torch.float64))
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))

    def reset(self) -> None:
        """Forget every batch seen (a new round estimates the widened model afresh)."""
        for b in self.buffers():
            b.zero_()

    @torch.no_grad()
    def decay_step(self) -> None:
        """Age every estimate by one mini-batch (call once per training step, before its updates)."""
        for b in (self.margin_sum, self.margin_weight, self.hard_sum, self.hard_weight):
            b.mul_(self.decay)
        self.pair_sum.mul_(self.decay)
        self.pair_weight.mul_(self.decay)
        self.batches += 1

    @torch.no_grad()
    def update(self, tasks: Sequence[int], margins: torch.Tensor, known: torch.Tensor) -> None:
        """Add one mini-batch of the tasks ``tasks`` (indices), seen on the same examples.

        Args:
            tasks: the task indices, one per column.
            margins: ``(B, len(tasks))`` error margins in [0, 1].
            known: ``(B, len(tasks))`` bool, True where the example is labelled for the task.
        """
        if margins.numel() == 0:
            return
        idx = torch.as_tensor(list(tasks), dtype=torch.long, device=self.margin_sum.device)
        m = margins.detach().to(self.margin_sum)  # (B, k)
        k = known.to(device=m.device, dtype=m.dtype)  # (B, k)
        count = k.sum(0)  # (k,)
        seen = count > 0
        batch_mean = (m * k).sum(0) / count.clamp_min(1.0)
        self.margin_sum[idx[seen]] += batch_mean[seen]
        self.margin_weight[idx[seen]] += 1.0
        threshold = self.margin_sum[idx] / self.margin_weight[idx].clamp_min(1e-300)  # E{m_i}, this batch in
        hard = (m >= threshold).to(m.dtype) * k  # e_ni on labelled examples, 0 elsewhere
        self.hard_sum[idx[seen]] += (hard.sum(0) / count.clamp_min(1.0))[seen]
        self.hard_weight[idx[seen]] += 1.0
        # concurrently easy or difficult: e_i e_j + (1 - e_i)(1 - e_j), over examples labelled for both
        easy = (1.0 - hard) * k
        agree = hard.T @ hard + easy.T @ easy  # (k, k)
        both = k.T @ k  # (k, k)
        ok = both > 0
        rows, cols = idx[:, None].expand_as(both), idx[None, :].expand_as(both)
        self.pair_sum[rows[ok], cols[ok]] += agree[ok] / both[ok]
        self.pair_weight[rows[ok], cols[ok]] += 1.0

    def difficult_rate(self) -> torch.Tensor:
        """``q_i = P(e_i = 1)`` per task (0.5 where a task has not been seen)."""
        q = self.hard_sum / self.hard_weight.clamp_min(1e-300)
        return torch.where(self.hard_weight > 0, q, torch.full_like(q, 0.5))

    def matrix(self, unpaired: str | float = "independent") -> torch.Tensor:
        """The ``(T, T)`` affinity matrix (float64, CPU): symmetric, ones on the diagonal. ``unpaired``:
        the value of pairs never labelled on one example ("independent": from their marginals)."""
        q = self.difficult_rate().cpu()
        if unpaired == "independent":
            independent = q[:, None] * q[None, :] + (1 - q[:, None]) * (1 - q[None, :])
        else:
            independent = torch.full((len(q), len(q)), float(unpaired), dtype=torch.float64)
        w = self.pair_weight.cpu()
        joint = self.pair_sum.cpu() / w.clamp_min(1e-300)
        a = torch.where(w > 0, joint, independent)
        a = (a + a.T) / 2
        a.fill_diagonal_(1.0)
        return a.clamp(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, decay={self.decay}"


def branch_affinity(affinity: torch.Tensor, branches: Sequence[Sequence[int]]) -> torch.Tensor:
    """Eqs. 7-8: the ``(c, c)`` affinity of ``c`` branches, each a list of task indices into ``affinity``.

    With one task per branch this is ``affinity`` itself."""
    a = torch.as_tensor(affinity, dtype=torch.float64)
    c = len(branches)
    out = torch.ones(c, c, dtype=torch.float64)
    for k in range(c):
        for l in range(c):
            if k == l:
                continue
            sub = a[list(branches[k])][:, list(branches[l])]  # (|I_k|, |J_l|)
            kl = sub.min(dim=1).values.mean()  # mean over i_k of min over j_l
            lk = sub.min(dim=0).values.mean()  # mean over j_l of min over i_k
            out[k, l] = (kl + lk) / 2
    return out


def task_margins(
    logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Margins and known-label masks of one task's outputs, one column per output (multilabel: per
    attribute) or one column (multi-class: ``1 - p(true class)``)."""
    if y.dim() == 1:
        p = torch.softmax(logits.detach().double(), dim=1).gather(1, y[:, None]).squeeze(1)
        return (1 - p)[:, None], torch.ones(len(y), 1, dtype=torch.bool, device=y.device)
    s = torch.sigmoid(logits.detach().double())
    m = (y.to(s.dtype) - s).abs()
    known = torch.ones_like(m, dtype=torch.bool) if mask is None else mask.bool()
    return m, known


__all__ = ["AffinityEstimator", "branch_affinity", "task_margins"]
