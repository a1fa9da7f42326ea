"""config/plainyaml.py: the configuration's YAML loader gives what PyYAML's safe loader gives.

Plain documents are built directly; everything else (merge keys, other tags,
unhashable keys, a node inside itself) goes to the safe loader, so results and
errors are the same.  Each case is loaded both ways and compared.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import yaml

from sendmail_shim.config import plainyaml

SAFE: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(text: str, loader: Any = plainyaml.Loader) -> Any:
    return yaml.load(text, Loader=loader)  # noqa: S506 - both loaders are safe ones

DOCUMENTS = [
    "",
    "a: 1\n",
    "sites:\n  a.test: {uids: [1001, web], domains: [a.test], quota: {per_hour: 5}}\n",
    "ints: [0, -3, +4, 0x1F, 0o17, 017, 1_000, '12', 190:20:30]\n",
    "bools: [yes, No, on, OFF, true, False, y, n]\n",
    "nulls: [~, null, Null, '', \"\"]\n",
    "floats: [1.5, -2e3, .5, 1_000.25, 6.8523015e+5]\n",
    "strings: ['quoted', \"double\\tquoted\", plain words, 'it''s']\nblock: |\n  two\n  lines\n",
    "dup: 1\ndup: 2\n",  # the last wins, as in PyYAML
    "base: &b {per_hour: 1, per_day: 2}\nsite: *b\nlist: [*b, *b]\n",
    "base: &b {per_hour: 1}\nsite:\n  <<: *b\n  per_day: 3\n",  # a merge key
    "when: 2026-12-08\nstamp: 2026-12-08T01:02:03Z\n",  # timestamps
    "raw: !!binary aGVsbG8=\n",
    "set: !!set {a, b}\n",
    "omap: !!omap [a: 1, b: 2]\n",
    "str_tag: !!str 123\nint_tag: !!int '7'\n",
    "= : value key\n",
    "1: one\n2.5: two\nnull: three\ntrue: four\n",
    "nested: [[1, [2, [3, {a: [4]}]]]]\n",
]


@pytest.mark.parametrize("text", DOCUMENTS)
def test_same_data_as_the_safe_loader(text: str) -> None:
    assert load(text) == load(text, SAFE)


def test_special_floats() -> None:
    got = load("[.inf, -.Inf, .nan]\n")
    assert got[0] == math.inf and got[1] == -math.inf and math.isnan(got[2])


def test_an_alias_is_the_anchors_object() -> None:
    got = load("a: &x [1, 2]\nb: *x\n")
    assert got["a"] is got["b"]


def test_a_nest_of_aliases_costs_its_nodes() -> None:
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    got = load("\n".join(lines) + "\n")  # 10**9 leaves if copied
    assert got["l8"][0] is got["l7"]


def test_a_node_inside_itself_is_left_to_the_safe_loader() -> None:
    got = load("a: &x [1, *x]\n")
    assert got["a"][1] is got["a"]


@pytest.mark.parametrize("text", [
    "? [a, b]\n: 1\n",  # an unhashable key
    "a: !python/object:os.system x\n",  # not in the safe subset
    "sites: [\n",  # not YAML
])
def test_same_errors_as_the_safe_loader(text: str) -> None:
    with pytest.raises(yaml.YAMLError) as ours:
        load(text)
    with pytest.raises(yaml.YAMLError) as theirs:
        load(text, SAFE)
    assert str(ours.value) == str(theirs.value)
