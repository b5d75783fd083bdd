"""PackNet (Mallya & Lazebnik, CVPR 2018): several tasks packed into one network by iterative pruning.

Registered as method ``packnet``. Public API:

* :class:`PackNet` — the method (``virtnet train`` with ``method: {name: packnet}``), ``PackNet.wrap``;
* :class:`PackNetModel` — the model: ``forward(x, task)``, ``begin_task``, ``prune``, ``export``,
  ``storage``, ``save_ownership`` / ``load_ownership``;
* :func:`wrap` — PackNet over a module you bring, plus a head per task;
* :class:`PackNetConfig` — the options;
* ownership map helpers: :class:`OwnershipMap`, :func:`pack_bits`, :func:`unpack_bits`,
  :func:`bits_per_weight`.

See docs/methods/packnet.md.
"""

from virtnet.methods.packnet.config import PackNetConfig
from virtnet.methods.packnet.method import PackNet, incremental_fractions
from virtnet.methods.packnet.model import PackNetModel, prunable_layer_types, wrap
from virtnet.methods.packnet.ownership import (
    OwnershipMap,
    bits_per_weight,
    load_ownership,
    pack_bits,
    packed_size,
    save_ownership,
    unpack_bits,
)

__all__ = [
    "OwnershipMap",
    "PackNet",
    "PackNetConfig",
    "PackNetModel",
    "bits_per_weight",
    "incremental_fractions",
    "load_ownership",
    "pack_bits",
    "packed_size",
    "prunable_layer_types",
    "save_ownership",
    "unpack_bits",
    "wrap",
]
