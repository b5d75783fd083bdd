"""The selector g(x) -> an h x n matrix of per-block level probabilities (eq. 2, 3), its decodings, and
the exact budgeted decoding (the most probable structure whose cost fits a bound, per instance).

Logits are ``(B, n, h)`` (block-major); a softmax over the last axis gives column ``C_i`` of eq. 2 and
``log P(z|x) = sum_i log C_i(l_i)`` (eq. 3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from virtnet.backbones.base import Stem
from virtnet.errors import BudgetError
from virtnet.protocol import TaskSpec


def shape_key(spec: TaskSpec) -> str:
    """Tasks with the same input shape share the selector's input layer."""
    return f"c{spec.in_channels}s{spec.input_size}"


class SelectorNet(nn.Module):
    """One task's selector: input layer, shared body, shared linear layer to ``n x h`` logits."""

    def __init__(self, stem: nn.Module, body: nn.Module, fc: nn.Module, blocks: int, levels: int) -> None:
        super().__init__()
        self.stem = stem
        self.body = body
        self.fc = fc
        self.blocks = blocks
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.body(self.stem(x)).mean(dim=(2, 3))  # (B, C)
        return self.fc(f).reshape(x.shape[0], self.blocks, self.levels)  # (B, n, h)


class Selector(nn.Module):
    """A small CNN: a 3x3 input layer per input shape (to ``width`` maps of ``size``), ``depth``
    conv3x3-BN-ReLU layers of stride 2 (doubling the width), global pooling, a linear layer to
    ``n x h`` logits. Xavier-initialised (Algorithm 1)."""

    def __init__(
        self, specs: list[TaskSpec], blocks: int, levels: int, width: int, depth: int, size: int
    ) -> None:
        super().__init__()
        self.blocks = blocks
        self.levels = levels
        self.stems = nn.ModuleDict()
        for s in specs:
            key = shape_key(s)
            if key not in self.stems:
                self.stems[key] = Stem(s.in_channels, s.input_size, width, size)
        layers: list[nn.Module] = []
        c = width
        for _ in range(depth):
            layers += [
                nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(2 * c),
                nn.ReLU(),
            ]
            c *= 2
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, blocks * levels)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def net(self, spec: TaskSpec) -> SelectorNet:
        """Task ``spec``'s selector, sharing this module's layers."""
        return SelectorNet(self.stems[shape_key(spec)], self.body, self.fc, self.blocks, self.levels)

    def forward(self, x: torch.Tensor, spec: TaskSpec) -> torch.Tensor:
        return self.net(spec)(x)

    def forward_tasks(self, inputs: list[tuple[torch.Tensor, TaskSpec]]) -> list[torch.Tensor]:
        """The logits of several tasks' batches ``[(x_t, spec_t), ...]``, the shared body run **once** over
        their concatenated input-layer outputs: in training its batch norms normalise with the statistics
        of the task mixture, which their running statistics (used at inference) estimate. (Run one task
        at a time, each task would train on its own statistics and be tested on the mixture's.)"""
        if len(inputs) == 1:
            x, spec = inputs[0]
            return [self(x, spec)]
        stems = [self.stems[shape_key(spec)](x) for x, spec in inputs]
        f = self.body(torch.cat(stems)).mean(dim=(2, 3))
        logits = self.fc(f).reshape(f.shape[0], self.blocks, self.levels)
        return list(logits.split([x.shape[0] for x, _ in inputs]))


# ---- decodings -------------------------------------------------------------------------------------------
def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Per-block log-probabilities ``(B, n, h)`` (eq. 2's columns, in logs)."""
    return F.log_softmax(logits, dim=-1)


def structure_log_prob(logp: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``log P(z|x)`` (eq. 3) of structures ``z`` ``(B, n)`` or ``(B, K, n)`` under ``logp`` ``(B, n, h)``."""
    if z.dim() == 2:
        return logp.gather(2, z[:, :, None]).squeeze(2).sum(1)
    b, k, n = z.shape
    lp = logp[:, None].expand(b, k, n, logp.shape[-1])
    return lp.gather(3, z[..., None]).squeeze(3).sum(2)


def greedy(logp: torch.Tensor) -> torch.Tensor:
    """The most probable structure ``(B, n)``: the argmax of every block (P factorises)."""
    return logp.argmax(-1)


def sample(
    logp: torch.Tensor, k: int = 1, epsilon: float = 0.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` structures per instance from the epsilon-greedy mixture ``q = (1-eps) P + eps U`` (U uniform
    over the ``h^n`` structures): ``(z (B, k, n), log q(z) (B, k))``; ``log q`` keeps the gradient of
    ``logp`` (REINFORCE must take it under the distribution it sampled from)."""
    b, n, h = logp.shape
    with torch.no_grad():
        probs = logp.detach().exp().reshape(b * n, h)
        z = torch.multinomial(probs, k, replacement=True, generator=generator)  # (B*n, k)
        z = z.reshape(b, n, k).permute(0, 2, 1)  # (B, k, n)
        if epsilon > 0:
            explore = torch.rand(b, k, generator=generator, device=logp.device) < epsilon
            uniform = torch.randint(0, h, (b, k, n), generator=generator, device=logp.device)
            z = torch.where(explore[..., None], uniform, z)
    lp = structure_log_prob(logp, z)
    if epsilon > 0:
        log_u = torch.full_like(lp, -n * math.log(h))
        lp = torch.logaddexp(math.log1p(-epsilon) + lp, math.log(epsilon) + log_u) if epsilon < 1 else log_u
    return z, lp


def top_k(logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable structures per instance, best first: ``(z (B, k, n), log P (B, k))``.

    Exact beam over blocks: the best ``k`` prefixes of blocks ``0..i`` extend to the best ``k`` of
    ``0..i+1`` because log P is a sum over blocks."""
    b, n, h = logp.shape
    beams = logp.new_zeros(b, 1)
    paths = torch.zeros(b, 1, 0, dtype=torch.long, device=logp.device)
    for i in range(n):
        cand = (beams[:, :, None] + logp[:, i, None, :]).reshape(b, -1)  # (B, K*h)
        kk = min(k, cand.shape[1])
        beams, idx = cand.topk(kk, dim=1)
        prev, lv = idx // h, idx % h
        paths = torch.cat([paths.gather(1, prev[..., None].expand(-1, -1, paths.shape[2])), lv[..., None]], 2)
    return paths, beams


def initial_structures(
    batch: int, blocks: int, levels: int, tau: float, device: torch.device
) -> torch.Tensor:
    """Structures from the initial distribution (eq. 8): the full structure with probability
    ``tau + (1 - tau) / h^n``, every other one with ``(1 - tau) / h^n`` (full with probability ``tau``,
    else uniform over all ``h^n``)."""
    z = torch.randint(0, levels, (batch, blocks), device=device)
    full = torch.rand(batch, device=device) < tau
    return torch.where(full[:, None], torch.full_like(z, levels - 1), z)


# ---- the most probable structure within a bound ---------------------------------------------------------
class BudgetPlan(nn.Module):
    """The most probable structure whose cost ``sum_i cost[i][l_i]`` fits ``bound``, per instance, exactly.

    Dynamic programming over blocks on the distinct partial costs (costs are the same for every instance
    of a task, so the states are too): ``best[b, s]`` is the largest log-probability of blocks ``0..i``
    reaching partial cost ``s``; states that cannot finish within the bound are dropped. When more than
    ``max_states`` distinct partial costs appear, costs are rounded *up* to a grid of ``bound / max_states``
    (the bound is then still never exceeded; the result is optimal for the rounded costs). ``bound=None``:
    no bound (the per-block argmax).

    The tables are buffers, so the plan exports with the network (``torch.export``: static shapes).
    """

    def __init__(self, costs: list[list[int]], bound: int | None, max_states: int = 20000) -> None:
        super().__init__()
        self.blocks = len(costs)
        self.levels = len(costs[0])
        self.bound = bound
        self.exact = True
        if bound is None:
            return
        tables = self._tables(costs, bound, max_states)
        if tables is None:
            q = max(1, math.ceil(bound / max_states))
            rounded = [[math.ceil(c / q) for c in row] for row in costs]
            tables = self._tables(rounded, bound // q, max_states * 4)
            self.exact = False
            if tables is None:  # pragma: no cover - the grid bounds the states
                raise BudgetError(f"budget {bound}: the search exceeds {max_states} states")
        for i, t in enumerate(tables):
            self.register_buffer(f"table{i}", t)

    def _tables(self, costs: list[list[int]], bound: int, max_states: int) -> list[torch.Tensor] | None:
        n, h = len(costs), len(costs[0])
        rest = [0] * (n + 1)
        for i in range(n - 1, -1, -1):
            rest[i] = rest[i + 1] + min(costs[i])
        if rest[0] > bound:
            raise BudgetError(
                f"budget {bound:,} is below the cheapest structure ({rest[0]:,}, in the same unit)"
            )
        states = [0]
        tables = []
        for i in range(n):
            sources: dict[int, list[int]] = {}
            for k, s in enumerate(states):
                for lv in range(h):
                    t = s + costs[i][lv]
                    if t + rest[i + 1] <= bound:
                        sources.setdefault(t, []).append(k * h + lv)
            if len(sources) > max_states:
                return None
            new = sorted(sources)
            pad = len(states) * h  # index of the -inf column
            width = max(len(v) for v in sources.values())
            table = torch.full((len(new), width), pad, dtype=torch.long)
            for j, t in enumerate(new):
                table[j, : len(sources[t])] = torch.tensor(sources[t])
            tables.append(table)
            states = new
        return tables

    def forward(self, logp: torch.Tensor) -> torch.Tensor:
        """Structures ``(B, n)`` for per-block log-probabilities ``logp`` ``(B, n, h)``."""
        if self.bound is None:
            return logp.argmax(-1)
        b, h = logp.shape[0], self.levels
        best = logp.new_zeros(b, 1)
        backs = []
        for i in range(self.blocks):
            table: torch.Tensor = getattr(self, f"table{i}").to(logp.device)
            cand = (best[:, :, None] + logp[:, i, None, :]).reshape(b, -1)
            cand = torch.cat([cand, cand.new_full((b, 1), float("-inf"))], 1)
            g = cand[:, table]  # (B, K', S)
            best, arg = g.max(-1)
            backs.append(table[None].expand(b, -1, -1).gather(2, arg[..., None]).squeeze(2))  # (B, K')
        k = best.argmax(1)
        levels = []
        for i in range(self.blocks - 1, -1, -1):
            j = backs[i].gather(1, k[:, None]).squeeze(1)
            levels.append(j % h)
            k = j // h
        return torch.stack(levels[::-1], 1)


__all__ = [
    "BudgetPlan",
    "Selector",
    "SelectorNet",
    "greedy",
    "initial_structures",
    "log_probs",
    "sample",
    "shape_key",
    "structure_log_prob",
    "top_k",
]
