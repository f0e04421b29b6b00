"""What a network family states in one place: the `Family` base class.

A family is one file of this package holding a `Family` subclass decorated with
`registry.register`. It states everything the pipeline needs to know about its networks:

  names / claims     the architecture names it builds (CIFAR: a fixed list; torchvision:
                     the torchvision names it claims, by prefix)
  build              the dense network from its name and class count
  label              the name as papers write it (resnet56 -> ResNet-56)
  init_*, bn_weight  its from-scratch initialization, for the scratch stage's re-init at
                     pruned widths (what its constructor would do)
  residual_bn        the last BN of each residual branch (zero-init-residual)
  fix_widths         width attributes of its own layers after their parameters were
                     replaced by narrower ones (rebuilding a pruned model from its shapes)
  sync_widths        widths its modules keep as attributes, after torch-pruning's surgery
  projections        module-name parts of its shortcut projections: not numbered as layers
                     (`pruning.groups.layer_numbers`), kept by `skip_downsample`
  residual_layers    layers of its own that carry a residual stream (their groups are
                     residual-coupled)
  pruners, opaque_layers, unwrapped_parameters
                     what torch-pruning's surgery needs for its layers (custom pruners,
                     layers traced as one node, per-channel parameters outside any layer)

The per-module hooks are asked of every family for every module (a pruned model's
modules are what they are, whichever name built it), so a family only answers for the
module types it defines; conv, BN, linear and LayerNorm widths are handled once in
`widths`.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import torch.nn as nn
import torchvision


class Family(abc.ABC):
    """A family of networks (see the module docstring). The defaults: no names, PyTorch's
    default init, nothing of its own to fix, number or prune."""

    name: ClassVar[str]  # the family's name (reports, errors)
    init_scheme: ClassVar[str] = "default"  # what `init.reinitialize` returns
    projections: ClassVar[tuple[str, ...]] = ()
    residual_layers: ClassVar[tuple[type[nn.Module], ...]] = ()
    opaque_layers: ClassVar[tuple[type[nn.Module], ...]] = ()
    from_torchvision: ClassVar[bool] = False  # builds torchvision models (CIFAR names shadow)
    catch_all: ClassVar[bool] = False  # torchvision: the family of names no other claims

    def names(self) -> list[str]:
        """The architecture names this family builds (in the order `known_archs` lists)."""
        return []

    def claims(self, tv_name: str) -> bool:
        """Whether a torchvision model name belongs to this family."""
        return False

    @abc.abstractmethod
    def build(self, name: str, num_classes: int, arch: dict[str, Any]) -> nn.Module:
        """The dense network `name` (one of `names()` or a claimed torchvision name),
        randomly initialized; `arch` is the whole plain-data description."""

    def label(self, name: str) -> str:
        """`name` as papers write it."""
        return name

    # ---------------------------------------------------------------- from-scratch init

    def init_module(self, m: nn.Module) -> bool:
        """Initialize a module of the family's own (or a layer it inits its own way);
        True when done, so the generic rules below are skipped."""
        return False

    def init_conv(self, m: nn.Conv2d) -> None:
        m.reset_parameters()

    def init_linear(self, m: nn.Linear) -> None:
        m.reset_parameters()

    def bn_weight(self, m: nn.modules.batchnorm._BatchNorm) -> float:
        """The initial BN gamma (beta is 0)."""
        return 1.0

    # ---------------------------------------------------------------- widths

    def residual_bn(self, m: nn.Module) -> nn.Module | None:
        """The last BN of m's residual branch, when m is a residual block of this family."""
        return None

    def fix_widths(self, m: nn.Module) -> bool:
        """Set the width attributes of m (a module of this family's own types) from its
        parameters' shapes; True when m is one."""
        return False

    def sync_widths(self, m: nn.Module) -> None:
        """After torch-pruning's surgery: widths m keeps as attributes."""
        return None

    # ---------------------------------------------------------------- surgery

    def pruners(self) -> dict[type[nn.Module], Any]:
        """torch-pruning pruners of the family's own layers (layer type -> pruner)."""
        return {}

    def unwrapped_parameters(self, m: nn.Module) -> list[tuple[nn.Parameter, int]]:
        """(parameter, channel dim) of m's per-channel parameters outside any layer."""
        return []


class TorchvisionFamily(Family):
    """Networks of torchvision, claimed by name prefix and built by `get_model`."""

    from_torchvision = True
    prefixes: ClassVar[tuple[str, ...]] = ()

    def claims(self, tv_name: str) -> bool:
        return tv_name.startswith(self.prefixes)

    def build(self, name: str, num_classes: int, arch: dict[str, Any]) -> nn.Module:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes,
                                            **self.build_args(name))

    def build_args(self, name: str) -> dict[str, Any]:
        """Extra constructor arguments of torchvision model `name`."""
        return {}


__all__ = ["Family", "TorchvisionFamily"]
