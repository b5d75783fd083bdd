"""Thin-network initialisation by simultaneous orthogonal matching pursuit (Lu et al. 2017, Sec. 3.1,
Algorithm 2; SOMP: Tropp, Gilbert & Strauss 2006).

For a layer of the wider pre-trained network with weight matrix ``W`` (``d`` rows, one per output channel:
a vectorised filter), choose ``d' < d`` rows ``omega`` that best represent every row (eq. 2)::

    min_{A, |omega| = d'} || W - A W[omega, :] ||_F

greedily: every row of ``W`` is a signal and every row an atom; at each step pick the atom whose
correlations with the current residuals have the largest sum of absolute values (Tropp's SOMP), then
project every signal on the span of the atoms picked so far. Layer by layer from the input: the thin
layer takes rows ``omega`` of ``W`` (and the same channels of its batch norm), and the next layer's input
columns are cut to ``omega`` before its own selection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from virtnet.errors import CheckpointError, ConfigError


def somp_select(weight: torch.Tensor, k: int) -> list[int]:
    """Indices of ``k`` rows of ``weight`` (``(d, ...)``, flattened per row) chosen by SOMP, in the order
    picked. ``k >= d`` gives every row in order."""
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64).cpu()  # (d, n)
    d = w.shape[0]
    if k >= d:
        return list(range(d))
    if k < 1:
        raise ValueError(f"somp_select: k must be >= 1, got {k}")
    y = w.T  # (n, d): the signals are the rows
    norms = w.norm(dim=1)  # (d,)
    scale = norms.max().clamp_min(1e-300)
    usable = norms > 1e-12 * scale
    atoms = w.T / norms.clamp_min(1e-300)  # (n, d): unit-norm atoms
    residual = y.clone()
    chosen: list[int] = []
    taken = torch.zeros(d, dtype=torch.bool)
    energy0 = float((y * y).sum())
    for _ in range(k):
        score = (atoms.T @ residual).abs().sum(dim=1)  # (d,): sum over signals of |<atom, residual>|
        score[taken | ~usable] = -1.0
        if float((residual * residual).sum()) <= 1e-24 * max(energy0, 1e-300) or float(score.max()) <= 0:
            # the picked rows already represent every row: take the largest remaining rows
            rest = torch.where(~taken)[0]
            i = int(rest[norms[rest].argmax()])
        else:
            i = int(score.argmax())
        chosen.append(i)
        taken[i] = True
        q, _ = torch.linalg.qr(w[chosen].T)  # (n, |chosen|): orthonormal basis of the picked rows
        residual = y - q @ (q.T @ y)
    return chosen


def reconstruction_error(weight: torch.Tensor, rows: list[int]) -> float:
    """``min_A ||W - A W[rows]||_F / ||W||_F`` (least squares)."""
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64).cpu()
    basis = w[rows]  # (k, n)
    coef = torch.linalg.lstsq(basis.T, w.T).solution  # (k, d)
    return float((w - (basis.T @ coef).T).norm() / w.norm().clamp_min(1e-300))


# ---- reading a pre-trained virtnet VGG ----------------------------------------------------------------
def _prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def vgg_layers(state: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """The layers of a virtnet multi-task VGG state dict (``joint``/``individual`` with model ``vgg``):
    ``{"stems": {name: (conv weight, bn)}, "layers": [(weight, bn), ...] (convs then hidden FCs),
    "heads": {task: (weight, bias)}}``; each ``bn`` a dict of the batch norm's tensors."""

    def bn(prefix: str) -> dict[str, torch.Tensor]:
        got = _prefixed(state, prefix)
        need = ("weight", "bias", "running_mean", "running_var")
        if any(n not in got for n in need):
            raise CheckpointError(f"{source}: no batch norm at '{prefix}' (a VGG with batch norm is needed)")
        return got

    stems: dict[str, Any] = {}
    for k in state:
        if k.startswith("stems.") and k.endswith(".conv.weight"):
            name = k[len("stems.") : -len(".conv.weight")]
            stems[name] = (state[k], bn(f"stems.{name}.bn."))
    convs = sorted(
        {int(k.split(".")[2]) for k in state if k.startswith("trunk.blocks.") and k.endswith(".0.weight")}
    )
    layers = [(state[f"trunk.blocks.{i}.0.weight"], bn(f"trunk.blocks.{i}.1.")) for i in convs]
    fcs = sorted(
        {int(k.split(".")[2]) for k in state if k.startswith("trunk.fc.") and k.endswith(".fc.weight")}
    )
    layers += [(state[f"trunk.fc.{j}.fc.weight"], bn(f"trunk.fc.{j}.bn.")) for j in fcs]
    heads = {
        k[len("heads.") : -len(".weight")]: (state[k], state.get(k[: -len("weight")] + "bias"))
        for k in state
        if k.startswith("heads.") and k.endswith(".weight") and k.count(".") == 2
    }
    if not stems or not layers:
        raise CheckpointError(
            f"{source}: not a virtnet VGG (expected stems.<task>.conv.weight and trunk.blocks.<i>.0.weight)"
        )
    return {"stems": stems, "layers": layers, "heads": heads}


def _copy_norm(dst: nn.Module, src: Mapping[str, torch.Tensor], rows: list[int]) -> None:
    idx = torch.as_tensor(rows, dtype=torch.long)
    for n in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, n).copy_(src[n][idx])
    if "num_batches_tracked" in src and getattr(dst, "num_batches_tracked", None) is not None:
        dst.num_batches_tracked.copy_(src["num_batches_tracked"])


@torch.no_grad()
def somp_init(
    model: Any, state: Mapping[str, torch.Tensor], source: str = "pre-trained network"
) -> dict[str, Any]:
    """Initialise a fresh :class:`~virtnet.methods.branching.model.BranchingNet` (one branch per layer)
    from a wider pre-trained virtnet VGG's ``state`` by SOMP, layer by layer (Algorithm 2). The stems
    share one selection (SOMP on their filters side by side), since they all feed the trunk's first
    layer. Heads take the pre-trained head of their task (their attribute's row), cut to the last
    selection. Returns the selected rows per layer.

    Raises:
        CheckpointError: the network is not a virtnet VGG with batch norm, or its layers do not match
            the thin model's (count, kernel, input channels, a task without a pre-trained stem).
        ConfigError: a thin layer wider than the pre-trained one (omega too large to select from).
    """
    from virtnet.methods.branching.model import weight_and_norm

    pre = vgg_layers(state, source)
    if any(len(layer) != 1 for layer in model.trunk):
        raise ConfigError("SOMP initialises a model before any widening")
    if len(pre["layers"]) != model.num_layers:
        raise CheckpointError(
            f"{source}: {len(pre['layers'])} trunk layers (convs after conv1_1, then hidden FCs), the thin "
            f"VGG-{model.depth} with {model.fc_layers} FC layers has {model.num_layers}"
        )
    selected: dict[str, list[int]] = {}
    # the stems: one selection for all of them
    pairs = []
    for key, stem in model.stems.items():
        name = key if key in pre["stems"] else None
        if name is None and key == "shared" and len(pre["stems"]) >= 1:
            name = next(iter(pre["stems"]))
        if name is None:
            raise CheckpointError(
                f"{source}: no pre-trained stem for task '{key}' (has {sorted(pre['stems'])})"
            )
        w, norm = pre["stems"][name]
        conv, _ = weight_and_norm(stem)
        if tuple(w.shape[1:]) != tuple(conv.weight.shape[1:]):
            raise CheckpointError(
                f"{source}: stem '{name}' filters have shape {tuple(w.shape[1:])}, the thin stem "
                f"{tuple(conv.weight.shape[1:])}"
            )
        pairs.append((stem, w, norm))
    width = model.stem_width
    if pairs[0][1].shape[0] < width:
        raise ConfigError(
            f"method.omega: conv1_1 is {width} wide, the pre-trained one {pairs[0][1].shape[0]}: "
            "SOMP selects from a wider network"
        )
    rows = somp_select(torch.cat([p[1].reshape(p[1].shape[0], -1) for p in pairs], dim=1), width)
    for stem, w, norm in pairs:
        conv, bn = weight_and_norm(stem)
        conv.weight.copy_(w[rows])
        _copy_norm(bn, norm, rows)
    selected["conv1_1"] = rows
    prev = rows
    for l, (w, norm) in enumerate(pre["layers"]):
        desc = model.plan[l]
        lin, bn = weight_and_norm(model.trunk[l][0])
        if w.dim() != lin.weight.dim() or tuple(w.shape[2:]) != tuple(lin.weight.shape[2:]):
            raise CheckpointError(
                f"{source}: layer {desc['name']} has weight {tuple(w.shape)}, "
                f"the thin layer {tuple(lin.weight.shape)}"
            )
        if w.shape[1] < max(prev) + 1:
            raise CheckpointError(
                f"{source}: layer {desc['name']} has {w.shape[1]} inputs, fewer than selected"
            )
        cut = w[:, prev]  # (d, d'_prev, ...): the input columns the layer below kept
        if cut.shape[0] < desc["out"]:
            raise ConfigError(
                f"method.omega: {desc['name']} is {desc['out']} wide, the pre-trained one {cut.shape[0]}: "
                "SOMP selects from a wider network"
            )
        rows = somp_select(cut, desc["out"])
        lin.weight.copy_(cut[rows])
        _copy_norm(bn, norm, rows)
        selected[desc["name"]] = rows
        prev = rows
    for i, (task, b, e) in enumerate(model.branch_tasks):
        if task not in pre["heads"]:
            continue  # no pre-trained head: keep the random one
        w, bias = pre["heads"][task]
        if w.shape[0] < e or w.shape[1] < max(prev) + 1:
            continue
        model.heads[i].weight.copy_(w[b:e][:, prev])
        if bias is not None and model.heads[i].bias is not None:
            model.heads[i].bias.copy_(bias[b:e])
    return selected


__all__ = ["reconstruction_error", "somp_init", "somp_select", "vgg_layers"]
