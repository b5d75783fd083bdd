"""``branching``: fully-adaptive feature sharing (Lu, Kumar, Zhai, Cheng, Javidi & Feris, "Fully-adaptive
Feature Sharing in Multi-Task Networks with Applications in Person Attribute Classification", CVPR 2017).

Algorithm 1, as run here::

    M0 <- thin-omega VGG (SOMP from a wider VGG with init_from, else random)
    phase "branching": train; every round_steps steps, while the tree can still branch:
        A   <- task affinity (eq. 6), estimated online from the round's mini-batches
        A_b <- branch affinity of the active layer's branches (eqs. 7-8)
        d, g <- argmin_d (d - 1) L0 2^p + alpha Ls(g_d)   (spectral clustering for each d; eqs. 9-11)
        d = 1: stop; else widen the layer below into d branches (copies: same function), rebuild the
        optimizer with each copy's state copied from its origin, and move the active layer one down
    training goes on with the final tree until the phase ends (and in a "final" phase, with final_epochs)

The rounds happen inside the phase, step-triggered, as in the paper (a widening every 1000 iterations of
one training run with one learning-rate schedule), because a new phase starts new optimizers; the
rounds' decisions are recorded in the tree (:meth:`BranchingNet.structure`), so a checkpoint of any
round loads as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from virtnet.backbones.base import TaskSpec
from virtnet.backbones.registry import default_feature_size
from virtnet.data.core import Batch
from virtnet.errors import CheckpointError
from virtnet.methods.base import Method, Phase, TrainContext, register, task_loss
from virtnet.methods.branching.affinity import branch_affinity, task_margins
from virtnet.methods.branching.clustering import choose_branches
from virtnet.methods.branching.config import BranchingConfig
from virtnet.methods.branching.model import BranchingNet
from virtnet.nn import call

BRANCHING = "branching"
FINAL = "final"


def concat_forward(model: BranchingNet, batches: dict[str, Batch]) -> dict[str, torch.Tensor]:
    """Every task's logits of one step, with one trunk pass over the tasks' concatenated batches: each
    branch normalises the rows of the tasks it serves, the statistics its running estimates hold at test
    time (as ``joint`` does for its shared trunk)."""
    tasks = list(batches)
    sizes = {t: len(batches[t]) for t in tasks}
    if model.shared_stem:
        h = call(model.stem(tasks[0]), torch.cat([batches[t].x for t in tasks]), None)
    else:
        h = torch.cat([call(model.stem(t), batches[t].x, None) for t in tasks])  # (sum B_t, C, S, S)
    wanted = [i for t in tasks for i in model.task_branch_tasks(t)]
    top = model.run_tree(h, sizes, wanted)
    return {t: model.head_outputs(top, t, sizes) for t in tasks}


@torch.no_grad()
def update_affinity(model: BranchingNet, logits: dict[str, torch.Tensor], batches: dict[str, Batch]) -> None:
    """Add one step's margins to the model's affinity estimate (one decay step, then each task's batch)."""
    model.affinity.decay_step()
    for t, out in logits.items():
        b = batches[t]
        m, known = task_margins(out, b.y, b.mask)  # (B, outputs or 1)
        idx = model.task_branch_tasks(t)
        if len(idx) != m.shape[1]:  # one branch task for the whole task: the mean over its known labels
            k = known.to(m.dtype)
            m = ((m * k).sum(1) / k.sum(1).clamp_min(1.0))[:, None]
            known = known.any(1, keepdim=True)
        model.affinity.update(idx, m, known)


@register
class Branching(Method):
    """A thin multi-task VGG that widens itself, top down, into a tree of branches (module docstring)."""

    name = "branching"
    Config = BranchingConfig
    Model = BranchingNet
    #: the affinity estimate and the widening decisions are per process (not averaged over ranks)
    data_parallel = False

    config: BranchingConfig

    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        c = self.config
        feature = backbone.feature_size if backbone.feature_size is not None else default_feature_size(specs)
        return BranchingNet(
            specs,
            depth=c.depth,
            omega=c.omega,
            fc_layers=c.fc_layers,
            feature_size=feature,
            attribute_tasks=c.attribute_tasks,
            shared_stem=c.shared_stem,
            dropout=backbone.dropout,
            decay=c.decay,
            init=backbone.init,
        )

    # ---- phases ------------------------------------------------------------------------------------
    def phases(self, tasks: list[str]) -> list[Phase]:
        out = [Phase(BRANCHING, list(tasks), 0)]
        if self.config.final_epochs > 0:
            out.append(Phase(FINAL, list(tasks), 1, {"epochs": self.config.final_epochs}))
        return out

    def on_phase_start(self, model: nn.Module, phase: Phase) -> None:
        """SOMP initialisation from ``init_from`` before the first phase (the model is still thin)."""
        assert isinstance(model, BranchingNet)
        if phase.index != 0 or not self.config.init_from or model.rounds:
            return
        from virtnet.methods.branching.somp import somp_init
        from virtnet.train.checkpoint import load_checkpoint

        path = self.config.init_from
        try:
            ck = load_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"method.init_from: {e}") from None
        somp_init(model, ck.model_state, str(path))

    # ---- training ------------------------------------------------------------------------------------
    def rounds_left(self, model: BranchingNet) -> bool:
        limit = self.config.max_rounds
        return model.can_widen() and (limit is None or len(model.rounds) < limit)

    def training_step(
        self, model: nn.Module, batches: dict[str, Batch], phase: Phase
    ) -> dict[str, torch.Tensor]:
        assert isinstance(model, BranchingNet)
        logits = concat_forward(model, batches)
        out: dict[str, torch.Tensor] = {}
        total = None
        for t, b in batches.items():
            loss = task_loss(logits[t], b)
            out[f"loss/{t}"] = loss.detach()
            total = loss if total is None else total + loss
        assert total is not None
        out["loss"] = total
        if model.training and phase.name == BRANCHING and self.rounds_left(model):
            update_affinity(model, logits, batches)
        return out

    def on_step_end(self, model: nn.Module, phase: Phase, ctx: TrainContext) -> None:
        """Count the round's steps; at ``round_steps``, choose the number of branches and widen."""
        assert isinstance(model, BranchingNet)
        if phase.name != BRANCHING or not self.rounds_left(model):
            return
        model.round_step += 1
        if int(model.round_step) < self.config.round_steps:
            return
        state_from = self.widening_round(model, ctx.global_step)
        if state_from:
            ctx.rebuild_optimizer(state_from)

    def widening_round(self, model: BranchingNet, step: int = 0) -> dict[str, str]:
        """One round's decision and widening (Algorithm 1's loop body) from the affinity estimated so far;
        returns the new parameters' origins (empty when the round chose one branch and stopped)."""
        c = self.config
        affinity = model.affinity.matrix(c.unpaired_affinity)  # (T, T)
        branches = model.branches_at(model.active)
        ab = branch_affinity(affinity, branches)  # (c, c)
        below = model.active - 1
        pools = model.pools_above(below)
        choice = choose_branches(ab, c.alpha, c.unit_cost, pools)
        model.record_round(
            {
                "step": int(step),
                "active_layer": model.layer_names[model.active],
                "layer": model.layer_names[below],
                "pools_above": pools,
                "alpha": c.alpha,
                "unit_cost": c.unit_cost,
                "unpaired_affinity": c.unpaired_affinity,
                "batches": int(model.affinity.batches),
                "branches": [list(b) for b in branches],
                "affinity": affinity,
                "branch_affinity": ab,
                "candidates": choice.candidates,
                "d": choice.num_branches,
                "groups": choice.labels,
            }
        )
        state_from = model.widen(choice.labels)
        model.affinity.reset()
        model.round_step.zero_()
        return state_from

    # ---- inspection ----------------------------------------------------------------------------------
    def summary(self, model: nn.Module, rows: list[dict[str, Any]]) -> dict[str, Any]:
        assert isinstance(model, BranchingNet)
        return {"tree": model.describe_tree()}


__all__ = ["Branching", "concat_forward", "update_affinity"]
