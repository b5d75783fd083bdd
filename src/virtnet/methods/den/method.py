"""Deep Elastic Networks (Ahn, Kim, Oh; "Deep Elastic Networks with Model Selection for Multi-Task
Learning", ICCV 2019).

Sketch (Algorithm 1):
1. The estimator: the backbone with every block's inner channels split into nested groups, h levels per
   block; a structure ``z = (l_1..l_n)`` picks a level per block (eq. 1). Stems and heads per task.
2. The selector g(x): a small CNN giving an ``h x n`` matrix of level probabilities, ``P(z|x)`` their
   product (eq. 2, 3).
3. Objective (4): ``E_{z ~ g(x)} [ L(f(x; z), y) + S(z) ]``, ``S(z) = rho * (mean_i d_i(l_i))^2`` (eq. 5),
   ``d_i(l)`` block i's parameter fraction at level l.
4. Alternating stages: the estimator (SGD, Nesterov) on structures drawn from p (stage 1: eq. 8 with
   tau = 0.75; later: the selector), then the selector (Adam) by REINFORCE (eq. 7) with |Z| samples per
   instance from the epsilon-greedy mixture, log-probabilities under that mixture, a self-critical
   baseline (the greedy structure's reward; ``baseline: none`` is the paper's); learning rates decayed
   per stage.
5. Inference: each instance's most probable structure (within a budget level's bound, exactly), run by
   the grouped path: block by block, instances grouped by their level, sliced weights, skipped blocks
   not executed.

Training runs through the one loop: one phase per stage part (``estimator-<s>``, ``selector-<s>``),
decided one at a time (``next_phase``: an optional convergence rule ends training early), each with its
own optimizer (the other part is frozen by the loop).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from virtnet.backbones.base import TaskSpec
from virtnet.backbones.registry import build_multitask
from virtnet.data.core import Batch
from virtnet.errors import CheckpointError, ConfigError
from virtnet.methods.base import Level, Method, OptimizerSpec, Phase, TrainContext, register, task_loss
from virtnet.methods.den.config import DENConfig
from virtnet.methods.den.model import ElasticNet
from virtnet.methods.den.selector import greedy, initial_structures, log_probs, sample
from virtnet.nn import Route, compact


def instance_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-instance loss ``(B,)``: cross-entropy, or the masked mean binary cross-entropy (multilabel)."""
    if batch.y.dim() == 1:
        return F.cross_entropy(logits, batch.y, reduction="none")
    per = F.binary_cross_entropy_with_logits(logits, batch.y.to(logits.dtype), reduction="none")
    if batch.mask is None:
        return per.mean(1)
    m = batch.mask.to(per.dtype)
    return (per * m).sum(1) / m.sum(1).clamp_min(1.0)


def sparsity(model: ElasticNet, z: torch.Tensor, rho: float) -> torch.Tensor:
    """``S(z) = rho * (mean_i d_i(l_i))^2`` (eq. 5) for structures ``z`` ``(..., n)``."""
    d = model.density_table().to(z.device)  # (n, h)
    n = d.shape[0]
    flat = z.reshape(-1, n)
    dz = d.gather(1, flat.t()).t().mean(1)  # (N,)
    return (rho * dz.pow(2)).reshape(z.shape[:-1])


def rewards(
    model: ElasticNet, x: torch.Tensor, batch: Batch, task: str, z: torch.Tensor, rho: float
) -> torch.Tensor:
    """``R(z; x, y) = L(f(x; z), y) + S(z)`` for structures ``z`` ``(B, K, n)``: ``(B, K)``, computed
    without gradient by the grouped path (the estimator in eval mode)."""
    b, k, n = z.shape
    with torch.no_grad():
        xs = x[:, None].expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])
        flat = z.reshape(b * k, n)
        logits = model(xs, task, Route(task, instance=flat))
        rep = Batch(
            batch.task,
            xs,
            batch.y[:, None].expand(b, k, *batch.y.shape[1:]).reshape(b * k, *batch.y.shape[1:]),
            None
            if batch.mask is None
            else batch.mask[:, None]
            .expand(b, k, *batch.mask.shape[1:])
            .reshape(b * k, *batch.mask.shape[1:]),
        )
        loss = instance_loss(logits, rep).reshape(b, k)
        return loss + sparsity(model, z, rho)


def reinforce_loss(logq: torch.Tensor, reward: torch.Tensor, baseline: torch.Tensor | None) -> torch.Tensor:
    """The surrogate whose gradient is eq. 7's estimate: ``mean_{b,k} (R - baseline) * log q(z)``."""
    adv = reward if baseline is None else reward - baseline[:, None]
    return (adv.detach() * logq).mean()


@register
class DEN(Method):
    """Deep elastic networks: an estimator of elastic blocks and a selector choosing a structure per
    instance."""

    name = "den"
    Config = DENConfig
    Model = ElasticNet
    config: DENConfig

    def __init__(self, config: DENConfig | None = None) -> None:
        super().__init__(config)
        self._calibration: dict[str, Any] = {}  # what the calibration phase restores at its end

    # ---- building ----------------------------------------------------------------------------------
    def build(self, specs: list[TaskSpec], backbone: Any) -> nn.Module:
        c = self.config
        if c.level_widths is not None and len(c.level_widths) != c.levels:
            raise ConfigError(f"method.level_widths: {len(c.level_widths)} widths for {c.levels} levels")
        base = build_multitask(backbone, specs, shared_stem=False)
        size = c.selector_size or min(32, base.trunk.input_size)
        return ElasticNet(
            base,
            c.levels,
            c.level_widths,
            c.budget_levels,
            c.budget_kind,
            (c.selector_width, c.selector_depth, size),
            c.max_states,
            c.task_bn,
        )

    # ---- phases ------------------------------------------------------------------------------------
    def _phase(self, tasks: list[str], k: int) -> Phase:
        stage, part = k // 2 + 1, ("estimator", "selector")[k % 2]
        epochs = self.config.estimator_epochs if part == "estimator" else self.config.selector_epochs
        info: dict[str, Any] = {"stage": stage, "part": part}
        if epochs is not None:
            info["epochs"] = epochs
        if self.config.stage_schedule is not None:
            info["schedule"] = self.config.stage_schedule
        return Phase(f"{part}-{stage}", list(tasks), k, info)

    def _calibration_phase(self, tasks: list[str], k: int) -> Phase:
        info = {"part": "calibrate", "forward_only": True, "epochs": self.config.calibration_epochs}
        return Phase("calibrate", list(tasks), k, info)

    def phases(self, tasks: list[str]) -> list[Phase]:
        out = [self._phase(tasks, k) for k in range(2 * self.config.stages)]
        if self.config.calibration_epochs > 0:
            out.append(self._calibration_phase(tasks, len(out)))
        return out

    def next_phase(self, tasks: list[str], done: list[Phase], history: list[dict[str, Any]]) -> Phase | None:
        """The next stage part; with ``converge_tol``, the stages end after a selector stage whose mean
        reward improved on the previous selector stage's by less than that (relative). Then, with
        ``calibration_epochs > 0``, the calibration phase (once)."""
        k = len(done)
        if done and done[-1].info.get("part") == "calibrate":
            return None
        end = k >= 2 * self.config.stages
        tol = self.config.converge_tol
        if not end and tol is not None and k >= 4 and k % 2 == 0:
            r = [self._stage_reward(history, f"selector-{s}") for s in (k // 2 - 1, k // 2)]
            end = r[0] is not None and r[1] is not None and r[0] - r[1] < tol * abs(r[0])
        if end:
            return self._calibration_phase(tasks, k) if self.config.calibration_epochs > 0 else None
        return self._phase(tasks, k)

    @staticmethod
    def _stage_reward(history: list[dict[str, Any]], phase: str) -> float | None:
        recs = [h for h in history if h.get("phase") == phase]
        if not recs:
            return None
        vals = [v for k, v in recs[-1].get("train", {}).items() if k.endswith("/reward")]
        return sum(vals) / len(vals) if vals else None

    def optimizers(self, model: nn.Module, phase: Phase) -> list[OptimizerSpec]:
        assert isinstance(model, ElasticNet)
        stage, part = int(phase.info["stage"]), phase.info["part"]
        scale = self.config.lr_decay ** (stage - 1)
        if part == "estimator":
            params = [p for n, p in model.named_parameters() if not n.startswith("selector.")]
            return [
                OptimizerSpec(
                    "estimator",
                    [{"params": params, "lr_scale": scale}],
                    kind="sgd",
                    options={"nesterov": True, "momentum": 0.9},
                )
            ]
        return [
            OptimizerSpec(
                "selector",
                [{"params": list(model.selector.parameters()), "lr_scale": scale}],
                kind="adam",
                lr=self.config.selector_lr,
                options={"weight_decay": 0.0},
            )
        ]

    def varying_parameters(self, phase: Phase) -> bool:
        return True  # a step's structures decide which private norms are used

    def on_phase_start(self, model: nn.Module, phase: Phase) -> None:
        model.den_progress.fill_(0.0)  # type: ignore[union-attr, operator]
        if phase.info.get("part") == "calibrate":
            assert isinstance(model, ElasticNet)
            self._calibration = model.start_calibration()

    def on_phase_end(self, model: nn.Module, phase: Phase) -> None:
        if phase.info.get("part") == "calibrate":
            assert isinstance(model, ElasticNet)
            model.end_calibration(self._calibration)
            self._calibration = {}

    def on_step_end(self, model: nn.Module, phase: Phase, ctx: TrainContext) -> None:
        model.den_progress.fill_(float(ctx.epoch))  # type: ignore[union-attr, operator]

    def epsilon(self, model: ElasticNet) -> float:
        """The exploration rate now: ``epsilon`` decayed linearly to 0 over the first ``epsilon_epochs``
        epochs of each selector stage (epoch of the step before, kept in the model for resumes)."""
        c = self.config
        if c.epsilon == 0 or c.epsilon_epochs == 0:
            return 0.0
        return c.epsilon * max(0.0, 1.0 - float(model.den_progress) / c.epsilon_epochs)

    # ---- training ----------------------------------------------------------------------------------
    def training_step(
        self, model: nn.Module, batches: dict[str, Batch], phase: Phase
    ) -> dict[str, torch.Tensor]:
        assert isinstance(model, ElasticNet)
        if phase.info["part"] == "estimator":
            return self._estimator_step(model, batches, int(phase.info["stage"]))
        if phase.info["part"] == "calibrate":
            return self._calibration_step(model, batches)
        return self._selector_step(model, batches)

    def _calibration_step(self, model: ElasticNet, batches: dict[str, Batch]) -> dict[str, torch.Tensor]:
        """A statistics step (no gradient): the estimator's batch norms accumulate the statistics of the
        structures inference chooses, each instance at a budget level drawn uniformly (the selector's most
        probable structure within that level's bound)."""
        tasks = list(batches)
        with torch.no_grad():
            model.eval()
            logits = model.selector_logits_tasks({t: batches[t].x for t in tasks})
            z = {}
            for t in tasks:
                logp = log_probs(logits[t])
                levels = model.levels(t)
                pick = torch.randint(0, len(levels), (logp.shape[0],), device=logp.device)
                zt = torch.empty(logp.shape[:2], dtype=torch.long, device=logp.device)
                for i, lv in enumerate(levels):
                    rows = (pick == i).nonzero().squeeze(1)
                    if rows.numel():
                        zt[rows] = model.plan(t, model.level_bound(t, lv))(logp[rows])
                z[t] = zt
        out_logits = model.calibration_forward({t: batches[t].x for t in tasks}, z)
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(())
        for t in tasks:
            loss = task_loss(out_logits[t], batches[t])
            out[f"loss/{t}"] = loss
            total = total + loss
        out["loss"] = total
        return out

    def _estimator_step(
        self, model: ElasticNet, batches: dict[str, Batch], stage: int
    ) -> dict[str, torch.Tensor]:
        """The estimator on one structure per instance (stage 1: eq. 8; later: sampled from the selector),
        masked path; every task's batch through the trunk in one forward (shared batch norms see the task
        mixture, as at inference: :meth:`ElasticNet.forward_tasks`; with ``task_bn`` not shared, each task
        through its own trunk). With ``train_full``, stages after the
        first add the full structure's loss on the same instances (in the same forward)."""
        c = self.config
        model.selector.eval()
        tasks = list(batches)
        with torch.no_grad():
            if stage == 1:
                z = {
                    t: initial_structures(
                        batches[t].x.shape[0], model.num_blocks, model.num_levels, c.tau, batches[t].x.device
                    )
                    for t in tasks
                }
            else:
                logits = model.selector_logits_tasks({t: batches[t].x for t in tasks})
                z = {t: sample(log_probs(logits[t]), 1)[0][:, 0] for t in tasks}
        xs = {t: batches[t].x for t in tasks}
        both = c.train_full and stage > 1  # one trunk pass over [sampled; full] per task
        if both:
            top = model.num_levels - 1
            zs = {t: torch.cat([zt, torch.full_like(zt, top)]) for t, zt in z.items()}
            out_logits = model.forward_tasks({t: torch.cat([x, x]) for t, x in xs.items()}, zs, masked=True)
        else:
            out_logits = model.forward_tasks(xs, z, masked=True)
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(())
        density = model.density_table()
        for t in tasks:
            if both:
                sampled, full = out_logits[t].chunk(2)
                loss = task_loss(sampled, batches[t])
                full_loss = task_loss(full, batches[t])
                out[f"loss/{t}/full"] = full_loss.detach()
                total = total + full_loss
            else:
                loss = task_loss(out_logits[t], batches[t])
            out[f"loss/{t}"] = loss.detach()
            out[f"den/{t}/density"] = density.to(z[t].device).gather(1, z[t].t()).mean().detach()
            total = total + loss
        out["loss"] = total
        return out

    def _selector_step(self, model: ElasticNet, batches: dict[str, Batch]) -> dict[str, torch.Tensor]:
        """The selector by REINFORCE (eq. 7) with the estimator fixed; every task's batch through the
        selector's shared body in one forward (its batch norms see the task mixture, as at inference)."""
        c = self.config
        for m in model.estimator_modules():
            m.eval()  # the estimator is fixed: running statistics, no updates
        model.selector.train()
        eps = self.epsilon(model)
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(())
        logits = model.selector_logits_tasks({t: b.x for t, b in batches.items()})
        for task, b in batches.items():
            logp = log_probs(logits[task])
            z, logq = sample(logp, c.samples, eps)
            r = rewards(model, b.x, b, task, z, c.rho)
            base = None
            if c.baseline == "self_critical":
                base = rewards(model, b.x, b, task, greedy(logp.detach())[:, None], c.rho)[:, 0]
            loss = reinforce_loss(logq, r, base)
            out[f"loss/{task}/reward"] = r.mean().detach()
            out[f"den/{task}/density"] = (
                model.density_table()
                .to(z.device)
                .gather(1, z.reshape(-1, model.num_blocks).t())
                .mean()
                .detach()
            )
            total = total + loss
        out["loss"] = total
        return out

    # ---- inference ---------------------------------------------------------------------------------
    def levels(self, model: nn.Module, task: str) -> list[Level]:
        assert isinstance(model, ElasticNet)
        out = []
        for lv in model.levels(task):
            bound = model.level_bound(task, lv)
            name = "selector" if bound is None else f"selector, {model.budget_kind} <= {bound:.4g}"
            out.append(Level(lv, name, model.route(task, lv)))
        return out

    def export(self, model: nn.Module, task: str, level: int | None = None) -> nn.Module:
        """The deployable of (task, budget level): selector, budgeted decoding and the estimator run by
        the grouped path, one standalone module ``net(x) -> logits``."""
        assert isinstance(model, ElasticNet)
        lv = self.level(model, task, level)
        return model.deployable(task, lv.index)

    def export_structure(self, model: nn.Module, task: str, z: Any) -> nn.Module:
        """Structure ``z`` of ``task`` as a standalone, physically sliced network ``net(x)``."""
        assert isinstance(model, ElasticNet)
        return compact(model.structure_network(task), model.structure_route(task, z))

    def shared_prefixes(self) -> tuple[str, ...]:
        return ("trunk.", "selector.body.", "selector.fc.")

    eval_titles = {
        "mean_flops": "mean FLOPs/inst (estimator)",
        "max_flops": "max FLOPs/inst (estimator)",
        "selector_flops": "selector FLOPs/inst",
        "mean_flops_with_selector": "mean FLOPs/inst (+ selector)",
        "estimator_params": "estimator params",
        "selector_params": "selector params",
    }

    def eval_columns(self, model: nn.Module, task: str, level: int, batches: list[Batch]) -> dict[str, Any]:
        """Per (task, budget level), over the evaluation inputs: the estimator FLOPs per instance of the
        structure the selector chose within the level's bound (``mean_flops``, ``max_flops``), the
        selector's FLOPs per instance, ``mean_flops_with_selector``, the estimator's and the selector's
        parameters (:func:`virtnet.methods.den.report.flops_columns`), and ``level_bound``: the level's bound
        on the estimator's ``budget_kind`` per instance (None: no bound)."""
        from virtnet.methods.den.report import chosen_costs, flops_columns

        assert isinstance(model, ElasticNet)
        _, costs = chosen_costs(model, task, level, batches)
        return {**flops_columns(model, task, costs), "level_bound": model.level_bound(task, level)}

    def summary(self, model: nn.Module, rows: list[dict[str, Any]]) -> dict[str, Any]:
        assert isinstance(model, ElasticNet)
        return {
            "estimator_params": model.estimator_parameters(),
            "selector_params": model.selector_parameters(),
            "blocks": model.num_blocks,
            "levels_per_block": model.num_levels,
        }

    # ---- a selector from another run ---------------------------------------------------------------------
    def load_selector(self, model: nn.Module, path: str) -> None:
        """Copy the selector of checkpoint ``path`` into ``model``; CheckpointError when it was trained
        for a different estimator (blocks, levels or widths)."""
        from virtnet.train.checkpoint import load_checkpoint

        assert isinstance(model, ElasticNet)
        ck = load_checkpoint(path)
        saved = ck.meta.get("structure") or {}
        own = model.structure()
        for key in ("blocks", "levels", "widths"):
            if saved.get(key) != own[key]:
                raise CheckpointError(
                    f"{path}: its selector was trained for another estimator ({key}: saved "
                    f"{saved.get(key)!r}, this model {own[key]!r})"
                )
        state = {k[len("selector.") :]: v for k, v in ck.model_state.items() if k.startswith("selector.")}
        try:
            model.selector.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{path}: its selector does not fit this model's: {first}") from None


__all__ = ["DEN", "instance_loss", "reinforce_loss", "rewards", "sparsity"]
