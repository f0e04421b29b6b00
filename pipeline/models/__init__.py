"""The networks: one file per family, their construction from data, MAC/parameter counts.

Architectures are described by a plain dict (`arch`: {"name", "num_classes", ...}) so a
checkpoint can rebuild them without pickled code. A pruned model is the same
architecture with narrower layers: `build_model(arch)` makes the dense network and
`shrink_to(model, state_dict)` narrows every layer to the shapes stored in the state
dict, after which `load_state_dict(strict=True)` succeeds. `pipeline.load_model(path)`
does both from a checkpoint file.

  family.py      what a family states: builder, init, residual BNs, label, width
                 fix-ups, shortcut projections, surgery needs (`Family`)
  registry.py    name -> family, and the questions asked of all families
  cifar_resnet.py, cifar_vgg.py, tv_resnet.py, torchvision_cnns.py, convnext.py,
  vision_transformers.py
                 the families; each registers itself
  build.py       ModelConfig, arch_spec, build_model
  init.py        from-scratch re-init (scratch stage), zero-init of residual BNs
  widths.py      shrink_to / fix_attributes: a pruned model rebuilt from its shapes
  counting.py    parameters and MACs
  loading.py     load_model / model_from_payload / load_pretrained

A new family is one new file here: every module of this package is imported below, and
each family module registers its `Family` on import.
"""

from __future__ import annotations

import importlib
import pkgutil

from .build import ModelConfig, arch_spec, build_model
from .cifar_resnet import CIFAR_RESNET_DEPTHS, BasicBlock, CifarResNet, PadShortcut
from .cifar_vgg import CIFAR_VGG, CIFAR_VGG_L1, CifarVGG
from .counting import complexity, count_macs, count_params, count_tp_macs, format_complexity
from .family import Family, TorchvisionFamily
from .init import reinitialize, residual_last_bns, zero_init_last_bn
from .loading import check_forward, load_model, load_pretrained, model_from_payload
from .registry import (
    FAMILIES,
    TORCHVISION_PREFIX,
    arch_label,
    check_arch,
    cifar_names,
    family_of,
    known_archs,
    register,
    sync_model_widths,
    torchvision_names,
)
from .widths import fix_attributes, shrink_to

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # registers the families it defines

__all__ = ["CIFAR_RESNET_DEPTHS", "CIFAR_VGG", "CIFAR_VGG_L1", "FAMILIES", "TORCHVISION_PREFIX",
           "BasicBlock", "CifarResNet", "CifarVGG", "Family", "ModelConfig", "PadShortcut",
           "check_forward",
           "TorchvisionFamily", "arch_label", "arch_spec", "build_model", "check_arch",
           "cifar_names", "complexity", "count_macs", "count_params", "count_tp_macs",
           "family_of", "fix_attributes", "format_complexity", "known_archs", "load_model",
           "load_pretrained", "model_from_payload", "register", "reinitialize",
           "residual_last_bns", "shrink_to", "sync_model_widths", "torchvision_names",
           "zero_init_last_bn"]
