"""TC-LoRA's parameter level: merge LoRA adapters through a joint CP decomposition of their deltas.

Pure tensor math (torch, tensorly, peft's merge utilities); no Lightning. Flow:
``AdapterStack`` → ``cp_decompose`` → ``merge_cp`` (or ``merge_baseline``) → ``MergedAdapter`` →
``merge_report`` / ``install_adapter`` / ``export_adapter`` / ``fold_into_base``; ``fold_in`` adds
a new adapter to an existing decomposition.
"""

from tclora.merge.baselines import (
    BASELINES,
    MERGE_SPACES,
    cart,
    cart_stacked,
    iso_c,
    knots_basis,
    knots_ties,
    merge_baseline,
    tsv,
)
from tclora.merge.core import CoreSpace, core_space, core_spaces, iter_core_spaces
from tclora.merge.cp import ENGINES, CPResult, cp_decompose, fold_in
from tclora.merge.export import export_adapter, fold_into_base, install_adapter, merged_lora_config
from tclora.merge.rules import (
    CP_RULES,
    MergedAdapter,
    component_analysis,
    merge_cp,
    merge_report,
    merge_report_per_module,
    ties_loadings,
)
from tclora.merge.stack import AdapterStack

__all__ = [
    "BASELINES",
    "ENGINES",
    "MERGE_SPACES",
    "CP_RULES",
    "AdapterStack",
    "CPResult",
    "CoreSpace",
    "MergedAdapter",
    "cart",
    "cart_stacked",
    "component_analysis",
    "core_space",
    "core_spaces",
    "cp_decompose",
    "export_adapter",
    "fold_in",
    "fold_into_base",
    "install_adapter",
    "iso_c",
    "iter_core_spaces",
    "knots_basis",
    "knots_ties",
    "merge_baseline",
    "merge_cp",
    "merge_report",
    "merge_report_per_module",
    "merged_lora_config",
    "ties_loadings",
    "tsv",
]
