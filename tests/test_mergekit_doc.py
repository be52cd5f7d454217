"""docs/mergekit.md's tables agree with the registry and the config reader, so they cannot go stale."""
import re
from pathlib import Path

import pytest

from centered_merge.config import TOP_KEYS, from_mapping
from centered_merge.errors import MergeConfigError
from centered_merge.methods import available
from centered_merge.methods.catalog import yaml_keys

DOC = Path(__file__).resolve().parents[1] / "docs" / "mergekit.md"
# mergekit's registry (merge_methods/registry.py and the easy_define methods), read from its code
MERGEKIT_METHODS = {"linear", "slerp", "nuslerp", "multislerp", "passthrough", "model_stock", "karcher", "arcee_fusion",
                    "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                    "della_linear", "sce", "nearswap", "ram", "ramplus_tl"}
MERGEKIT_KEYS = {"merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "tokenizer", "chat_template"}
STATUSES = {"supported", "supported with a difference", "refused"}


def _table(section: str):
    text = DOC.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        m = re.match(r"\| `([^`]+)` \| ([^|]+) \|(.*)\|\s*$", line)
        if m:
            rows.append((m.group(1), m.group(2).strip(), [c.strip() for c in m.group(3).split("|")]))
    return rows


def test_every_mergekit_method_listed_with_a_true_status():
    rows = _table("Methods")
    assert {r[0] for r in rows} == MERGEKIT_METHODS
    for name, status, cells in rows:
        assert status in STATUSES, name
        cfg = {"merge_method": name, "base_model": "b", "models": [{"model": "a"}, {"model": "c"}]}
        if status == "refused":
            assert name not in available(), f"{name} is registered now: docs/mergekit.md says refused"
            with pytest.raises(MergeConfigError, match="not supported"):
                from_mapping(cfg)
            continue
        assert name in available(), f"docs/mergekit.md says {name} is supported"
        if status == "supported with a difference":
            assert cells[1], f"{name}: say which difference"
        keys = yaml_keys(name)
        for p in (x.strip() for x in cells[0].split(",") if x.strip()):
            if p.endswith("(ignored)"):
                assert p.split()[0] not in keys, f"{name}: {p} is declared now"
            else:
                assert p in keys, f"{name}: mergekit's {p!r} is not a declared parameter"


def test_every_config_key_listed():
    rows = _table("Config keys")
    listed = {r[0] for r in rows}
    assert MERGEKIT_KEYS <= listed and set(TOP_KEYS) <= listed
    for key, status, _ in rows:
        assert status in STATUSES, key
        if status == "refused":
            assert key not in TOP_KEYS
            with pytest.raises(MergeConfigError, match=key):
                from_mapping({"merge_method": "linear", "models": ["a"], key: {}})
        else:
            assert key in TOP_KEYS, key


def test_chat_template_names_listed_are_ours():
    from centered_merge.io.chat_templates import TEMPLATES

    row = next(cells for key, _, cells in _table("Config keys") if key == "chat_template")
    named = set(re.findall(r"`([a-z0-9]+)`", row[0].split("(", 1)[1].split(")", 1)[0]))
    assert named == set(TEMPLATES), "docs/mergekit.md's chat_template names differ from io/chat_templates.py"
