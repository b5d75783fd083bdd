"""Starting a model from a trained checkpoint (``init_from``), shared by the sequential methods."""

from __future__ import annotations

from torch import nn

from virtnet.errors import CheckpointError
from virtnet.train.checkpoint import load_checkpoint


def load_matching(model: nn.Module, path: str) -> list[str]:
    """Copy the tensors of checkpoint ``path`` whose names and shapes match ``model``'s; the trunk must
    match entirely. Returns the names copied."""
    ck = load_checkpoint(path)
    own = model.state_dict()
    trunk_keys = [k for k in own if k.startswith("trunk.")]
    for k in trunk_keys:
        if k not in ck.model_state or ck.model_state[k].shape != own[k].shape:
            raise CheckpointError(
                f"{path}: saved for a different network: its trunk has no tensor '{k}' of "
                f"shape {tuple(own[k].shape)}"
            )
    copied = [k for k, v in ck.model_state.items() if k in own and own[k].shape == v.shape]
    model.load_state_dict({**own, **{k: ck.model_state[k] for k in copied}})
    return copied
