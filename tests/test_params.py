"""Each method declares its parameters once; the CLI, the YAML front end, the README table and describe() derive
from that declaration. This walks the registry, so a new method or parameter is covered without editing it."""
import math
from pathlib import Path

import pytest

from centered_merge.cli import _merge_request, build_parser
from centered_merge.config import METHOD_ALIASES, from_mapping
from centered_merge.errors import MergeConfigError
from centered_merge.methods import available, get_method, method_class
from centered_merge.methods.catalog import cli_options, method_table, readme_with_table, yaml_keys
from centered_merge.methods.params import KINDS, Param
from centered_merge.methods.schedule import from_yaml as to_schedule

ROOT = Path(__file__).resolve().parents[1]
ALL = [(m, p) for m in available() for p in method_class(m).parameters]


def _valid(p: Param):
    """A value the parameter accepts, as a Python value and as CLI text."""
    examples = {"float": 0.5 if p.hi is None or p.hi >= 0.5 else p.hi, "int": 3, "bool": True,
                "rank": 0.25, "indices": "0-1", "patterns": ["x"], "floats": [1.0, 2.0]}
    v = p.choices[-1] if p.kind == "choice" else examples[p.kind]
    if p.kind == "float" and p.lo is not None and v < p.lo:
        v = p.lo + 1.0
    return v


def _required(method: str) -> dict:
    return {p.name: _valid(p) for p in method_class(method).parameters if p.required}


def _cli_text(v):
    return [str(x) for x in v] if isinstance(v, list) else [str(v)]


def _bad(p: Param):
    """(value, CLI text or None where a shell cannot say it) pairs the parameter must refuse."""
    out = []
    if p.kind in ("float", "int", "rank", "floats"):
        out += [("abc", "abc"), (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), (True, None)]
        if not p.per_model and not p.schedulable and p.kind != "floats":
            out.append(([1.0, 2.0], None))  # a list where a number belongs
        if p.schedulable:  # a gradient or a filter list with one bad value in it
            out += [([0.5, math.nan], None), ([{"filter": "mlp", "value": "abc"}, {"value": 0.5}], None)]
        if p.lo is not None:
            out.append((p.lo - 1.0, str(p.lo - 1.0)))
        if p.hi is not None:
            out.append((p.hi + 1.0, str(p.hi + 1.0)))
    if p.kind == "int":
        out.append((2.5, "2.5"))
    if p.kind == "choice":
        out += [("nope", "nope"), (3, None)]
    if p.kind == "bool":
        out += [("yes", None), (1, None)]
    if p.kind in ("indices", "patterns"):
        out += [(3.5, None), ({"a": 1}, None)]
    return out


def _yaml_cfg(method: str, key: str, p: Param, value, need=None):
    entry = {"models": [{"model": "a"}, {"model": "b"}], "base_model": "base"}
    glob = dict(need or {})
    yaml_method = method if method in METHOD_ALIASES else None
    assert yaml_method, f"{method} cannot be named as merge_method in YAML"
    if p.per_model:
        entry["models"] = [{"model": "a", "parameters": {key: value}}, {"model": "b", "parameters": {key: value}}]
        return {"merge_method": yaml_method, **entry, "parameters": glob}
    return {"merge_method": yaml_method, **entry, "parameters": {**glob, key: value}}


def _cli(method: str, flag: str, texts, need=None):
    args = [f"{flag}={texts[0]}"] if len(texts) == 1 else [flag, *texts]  # --x=-inf: not read as an option
    for k, x in (need or {}).items():
        args.append(f"{method_class(method).param(k).cli_flag}={x}")
    a = build_parser().parse_args(["merge", "a", "b", "--base", "base", "--method", method, *args])
    return _merge_request(a)


def test_every_declaration_is_complete():
    assert available(), "no methods registered"
    for m in available():
        cls = method_class(m)
        assert cls.summary, f"{m}: no summary for the README table"
        assert cls.defaults == {p.name: p.default for p in cls.parameters}
        for p in cls.parameters:
            assert p.help and p.kind in KINDS, (m, p.name)
            if p.default is not None:  # every default passes its own check
                assert p.check(m, p.default) == p.default, (m, p.name)
        get_method(m, **_required(m))  # the defaults build


@pytest.mark.parametrize("method,p", ALL, ids=[f"{m}.{p.name}" for m, p in ALL])
def test_parameter_reachable_from_cli_and_yaml_with_one_validation(method, p):
    flags = {o.flag: o for o in cli_options()}
    opt = flags.get(p.cli_flag)
    assert opt is not None and method in [m for m, _ in opt.methods], f"{method}.{p.name} has no CLI flag"
    assert set(p.yaml_keys) <= set(yaml_keys(method))

    v = _valid(p)
    need = {k: x for k, x in _required(method).items() if k != p.name}
    want = get_method(method, **need, **{p.name: v}).params[p.name]
    if p.kind != "bool":
        got_cli = _cli(method, p.cli_flag, _cli_text(v), need)["params"][p.name]
        assert get_method(method, **need, **{p.name: got_cli}).params[p.name] == want
    else:
        assert _cli(method, p.cli_flag, [], need)["params"][p.name] is True
    for key in p.yaml_keys:
        req = from_mapping(_yaml_cfg(method, key, p, v, need))
        if not p.per_model and p.name in req["params"]:
            assert get_method(method, **req["params"]).params[p.name] == want, key

    for value, text in _bad(p):
        as_python = to_schedule(value, None, "x") if p.schedulable and isinstance(value, list) else value
        with pytest.raises(MergeConfigError) as from_python:
            get_method(method, **need, **{p.name: as_python})
        assert p.name in str(from_python.value)
        for key in p.yaml_keys:
            with pytest.raises(MergeConfigError) as from_yaml:
                from_mapping(_yaml_cfg(method, key, p, value, need))
            assert p.name in str(from_yaml.value), (key, value, str(from_yaml.value))
            if not p.per_model:
                assert str(from_yaml.value) == str(from_python.value)  # one check, one message
        if text is None:
            continue
        try:
            _cli(method, p.cli_flag, [text], need)
        except SystemExit as e:  # argparse refused the text itself (not a number): exit 2 naming the flag
            assert e.code == 2 and p.kind in ("float", "int", "rank", "floats"), (p.name, text)
        except MergeConfigError as e:
            assert str(e) == str(from_python.value) or p.name in str(e), (p.name, text, str(e))
        else:
            pytest.fail(f"--{p.name} {text} accepted for {method}")


def test_bad_value_messages(capsys):
    for method, kw, pattern in [
        ("ties", {"density": 1.5}, r"ties: density must be <= 1; got 1.5"),
        ("ties", {"density": float("nan")}, r"ties: density must be a number; got NaN"),
        ("cart", {"lam": float("inf")}, r"cart: lam must be finite; got inf"),
        ("cart", {"lam": "2"}, r"cart: lam must be a number; got '2'"),
        ("dare", {"p": [0.1]}, r"dare: p must be a number; got \[0.1\]"),
        ("cart", {"svd": "fast"}, r"cart: svd must be one of randomized, exact; got 'fast'"),
        ("cart", {"sketch_dtype": "float16"}, r"sketch_dtype must be one of auto, float32, bfloat16"),
        ("dare", {"seed": 1.5}, r"dare: seed must be an integer; got 1.5"),
        ("weight_average", {"weights": [1, -1]}, r"weight_average: weights must be >= 0; got -1 \(model 1\)"),
    ]:
        with pytest.raises(MergeConfigError, match=pattern):
            get_method(method, **kw)
    from centered_merge.cli import main

    assert main(["merge", "a", "b", "--method", "ties", "--base", "c", "--density", "2", "--out", "o"]) == 1
    assert "ties: density must be <= 1; got 2" in capsys.readouterr().err  # before any file is opened


def test_drift_of_the_old_hand_kept_copies_is_gone():
    """--method dare is offered, DARE's p has a flag, sketch_dtype passes YAML (the three drifts of issue 9)."""
    parser_help = build_parser()._subparsers._group_actions[0].choices["merge"].format_help()
    assert "dare" in parser_help and "--p P" in parser_help and "--sketch-dtype" in parser_help
    req = from_mapping({"merge_method": "cart", "models": ["a", "b"], "parameters": {"sketch_dtype": "float32"}})
    assert req["params"] == {"sketch_dtype": "float32"}
    a = build_parser().parse_args(["merge", "a", "b", "--base", "c", "--method", "dare", "--p", "0.3"])
    assert _merge_request(a)["params"] == {"p": 0.3}


def test_one_flag_means_one_thing():
    for opt in cli_options():
        kinds = {(p.name, p.kind, p.per_model) for _, p in opt.methods}
        assert len(kinds) == 1, opt.flag


def test_readme_table_matches_registry():
    text = (ROOT / "README.md").read_text()
    assert readme_with_table(text) == text, "README method table is stale: python -m centered_merge.methods.catalog README.md"
    for m in available():
        assert f"| `{m}` |" in method_table()


def test_describe_lists_every_declared_parameter():
    for m in available():
        d = get_method(m, **_required(m)).describe()
        assert d["method"] == m
        declared = {p.name for p in method_class(m).parameters}
        assert set(d) - {"method"} <= declared


def test_aliases_reach_the_same_parameter():
    assert get_method("ties", **{"lambda": 0.5}).params["lam"] == 0.5
    assert get_method("cart", prior=1.5).params["lam"] == 1.5
    with pytest.raises(MergeConfigError, match="both given"):
        get_method("cart", lam=1.0, prior=1.5)
