"""Cost accounting of any (task, level) network: parameters, FLOPs, bytes, latency, reports and plots.

Every function takes a standalone exported network (``forward(x)``, e.g. :meth:`Method.export`'s result)
or result rows; see ``docs/cost.md`` for the counting rule, the FLOPs unit and how latency is measured.
"""

from virtnet.cost.flops import count_flops, flop_counts
from virtnet.cost.latency import FORMATS, latency_profile, measure_interleaved, measure_latency
from virtnet.cost.params import (
    bytes_on_disk,
    count_buffers,
    count_parameters,
    density,
    parameter_breakdown,
    tensor_bytes,
    usage_breakdown,
    used_parameters,
)
from virtnet.cost.plots import plot_accuracy_vs_density, plot_error_matrix
from virtnet.cost.report import (
    REQUIRED_KEYS,
    ROW_KEYS,
    check_rows,
    column_header,
    cost_of,
    level_costs,
    machine_info,
    make_row,
    markdown_table,
    write_report,
)

__all__ = [
    "FORMATS",
    "REQUIRED_KEYS",
    "ROW_KEYS",
    "bytes_on_disk",
    "check_rows",
    "column_header",
    "cost_of",
    "count_buffers",
    "count_flops",
    "count_parameters",
    "density",
    "flop_counts",
    "latency_profile",
    "level_costs",
    "machine_info",
    "make_row",
    "markdown_table",
    "measure_interleaved",
    "measure_latency",
    "parameter_breakdown",
    "plot_accuracy_vs_density",
    "plot_error_matrix",
    "tensor_bytes",
    "usage_breakdown",
    "used_parameters",
    "write_report",
]
