"""YAML loading with a bound on alias expansion, refusing duplicate keys.

PyYAML's safe loader shares the node an alias points at, so a few hundred bytes of nested
anchors (a "billion laughs" file) load as a small graph that expands to billions of
values as soon as anything walks it: merging, validating, hashing or printing it in an
error message. `load` counts the values the document expands to and refuses it beyond
`MAX_VALUES`, and refuses an alias that refers to itself, before anything is built.

A key given twice in one mapping is refused too (plain YAML keeps the last one silently),
naming both lines; keys merged in with `<<` may still be overridden.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

from .errors import show_value

MAX_VALUES = 100_000  # values (scalars, lists, mappings) a document may expand to


class BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses documents whose aliases expand beyond MAX_VALUES, and
    mappings that give a key twice."""

    def compose_document(self) -> Node | None:
        node = super().compose_document()
        if node is not None:
            _expanded_size(node, {}, set(), self)
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise ConstructorError(None, None, f"duplicate key {show_value(key)} (first "
                                       f"given on line {first})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _expanded_size(node: Node, sizes: dict[int, int], active: set[int],
                   loader: BoundedLoader) -> int:
    """The values under `node` with every alias expanded (memoized per shared node)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise ComposerError(None, None, "an alias refers to the mapping or list that holds it "
                            "(recursive alias)", node.start_mark)
    total = 1
    if isinstance(node, (SequenceNode, MappingNode)):
        active.add(key)
        children = (node.value if isinstance(node, SequenceNode)
                    else [n for pair in node.value for n in pair])
        for child in children:
            total += _expanded_size(child, sizes, active, loader)
            if total > MAX_VALUES:
                raise ComposerError(None, None, f"aliases expand to more than {MAX_VALUES:,} "
                                    "values (an alias bomb?); refused", child.start_mark)
        active.discard(key)
    sizes[key] = total
    return total


def load(text: str) -> Any:
    """`yaml.safe_load(text)` with the alias bound; raises yaml.YAMLError."""
    try:
        return yaml.load(text, Loader=BoundedLoader)
    except RecursionError:
        raise yaml.YAMLError("lists or mappings nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise yaml.YAMLError(str(err).split(";")[0]) from None


__all__ = ["MAX_VALUES", "BoundedLoader", "load"]
