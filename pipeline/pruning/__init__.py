"""Structured filter pruning: our criteria, torch-pruning's dependency-aware surgery.

  criteria   a score per output channel (fpgm, l1, l2, random, taylor, bn_scale,
             group_l2): the `CRITERIA` registry
  spec       `PruneSpec`, the keys of a prune stage, its validation, `PruningError`
  groups     the channel groups pruned together, policies, include/skip, layer numbers
  selection  which filters go: counts and rounding, local, FPGM-mix and global selection
  surgery    torch-pruning's dependency graph and the removal (`remove_filters`)
  search     the `target_macs_reduction` search, step by step
  heads      attention-head pruning (`heads`): whole heads of ViT/Swin attention
  prune      `prune_model` and `select_filters`, the entry points
  soft       soft pruning during training: zeroed filters, re-selected every epoch
"""

from .criteria import CRITERIA, fpgm_scores
from .groups import LayerRefError, candidate_groups, layer_numbers
from .heads import prune_heads, select_heads
from .prune import prune_model, select_filters
from .selection import prune_count
from .soft import SoftPruner, SoftPruneSpec, zero_pattern_record
from .spec import SELECTION_KEYS, FPGMConfig, PruneSpec, PruningError
from .surgery import build_graph, remove_filters

__all__ = ["CRITERIA", "FPGMConfig", "LayerRefError", "PruneSpec", "PruningError",
           "SELECTION_KEYS", "SoftPruneSpec", "SoftPruner", "build_graph", "candidate_groups",
           "fpgm_scores", "layer_numbers", "prune_count", "prune_heads", "prune_model",
           "remove_filters", "select_filters", "select_heads",
           "zero_pattern_record"]
