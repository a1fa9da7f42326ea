"""The YAML loader of the configuration: PyYAML's safe loader, faster on plain documents.

With 10,000 sites the configuration is a 3 MB file of 240,000 nodes; PyYAML's
safe loader spends a third of its time building the Python objects, node by
node through its general machinery (states, generators, a table of every
object).  A configuration is plain YAML: mappings, sequences, strings, numbers,
booleans and nulls.  :class:`Loader` builds those directly and hands anything
else to the safe loader itself: merge keys (``<<``), the ``=`` value key, other
tags (timestamps, binary, sets, ``!tags``), an unhashable key, a node that
contains itself.  So the result is what ``yaml.safe_load`` gives, errors
included (they come from the safe loader).  :func:`load` also pauses Python's
cycle collector, which otherwise runs again and again over the growing tree
(10,000 sites: 0.5 s with both, 0.9 s with the pause alone, 2.7 s with
neither; bench/scale).

Trusts: the document comes from the operator's file (as for ``safe_load``).
Guarantees: the same Python data as PyYAML's (libyaml) safe loader for every
document; an alias gives the same object as its anchor, as there, so a nest of
aliases costs what its nodes cost, not more.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

_T = "tag:yaml.org,2002:"
_SPECIAL_KEYS = (_T + "merge", _T + "value")
# libyaml's loader when PyYAML was built with it (Debian's python3-yaml is): 8 times the
# speed of the pure-Python one, same YAML 1.1 safe subset, same line marks in errors.
_Base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector off for the duration (back on after, if it was).

    Building 240,000 nodes and then the objects, nothing of which is garbage until the
    end, the collector ran again and again over the growing tree: 80 % of the time of
    reading 10,000 sites (2.5 s of 3.0; 0.5 s without).  Nothing made while reading is
    cyclic garbage that must go early; the collector runs again after.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load(stream: IO[str] | IO[bytes] | str | bytes) -> Any:
    """The document of ``stream``, as ``yaml.safe_load`` gives it."""
    with collector_paused():
        return yaml.load(stream, Loader=Loader)  # noqa: S506 - a safe loader


class _NotPlain(Exception):
    """This document needs the safe loader's own construction."""


class Loader(_Base):  # type: ignore[valid-type, misc]
    """``yaml.load(stream, Loader=Loader)``: safe, plain documents built directly."""

    def construct_document(self, node: Node) -> Any:
        try:
            return self._plain(node, {}, set())
        except _NotPlain:
            return super().construct_document(node)

    def _plain(self, node: Node, made: dict[int, Any], open_: set[int]) -> Any:
        tag = node.tag
        if type(node) is ScalarNode:
            if tag == _T + "str":
                return node.value
            if tag == _T + "int":
                return self.construct_yaml_int(node)
            if tag == _T + "bool":
                return self.construct_yaml_bool(node)
            if tag == _T + "null":
                return None
            if tag == _T + "float":
                return self.construct_yaml_float(node)
            raise _NotPlain
        key = id(node)
        if key in made:  # an alias: the anchor's object
            return made[key]
        if key in open_:  # a node inside itself
            raise _NotPlain
        open_.add(key)
        out: Any
        if type(node) is SequenceNode and tag == _T + "seq":
            out = [self._plain(item, made, open_) for item in node.value]
        elif type(node) is MappingNode and tag == _T + "map":
            out = {}
            for key_node, value_node in node.value:
                if key_node.tag in _SPECIAL_KEYS:
                    raise _NotPlain
                name = self._plain(key_node, made, open_)
                if isinstance(name, (list, dict)):
                    raise _NotPlain  # the safe loader's "found unhashable key"
                out[name] = self._plain(value_node, made, open_)
        else:
            raise _NotPlain
        open_.discard(key)
        made[key] = out
        return out
