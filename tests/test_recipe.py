"""Tests for adaptool.recipe: schema, strict validation with line numbers, path resolution."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adaptool.errors import AdaptoolError
from adaptool.recipe import (
    STRATEGIES,
    AdapterSpec,
    MergeParameters,
    OutputSpec,
    Recipe,
    ModuleRules,
    RecipeError,
    Rule,
    is_hub_id,
    load_recipe,
    parse_recipe,
    parameters_used,
    recipe_from_mapping,
    resolve_location,
    value_at,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def parse(text: str, base_dir: Path = Path("/r"), **kwargs) -> Recipe:
    return parse_recipe(textwrap.dedent(text), base_dir, "recipe.yaml", **kwargs)


def error(text: str, **kwargs) -> str:
    with pytest.raises(AdaptoolError) as info:
        parse(text, **kwargs)
    line = str(info.value)
    assert "\n" not in line
    return line


MINIMAL = """\
adapters:
  - path: a
output:
  path: out
"""


# ---------------------------------------------------------------------------------------------
# Defaults, normalisation, the dataclasses


def test_minimal_recipe_gets_every_default():
    r = parse(MINIMAL)
    assert r == Recipe(
        base=None,
        adapters=(AdapterSpec("/r/a", 1.0),),
        strategy="linear",
        space="delta",
        parameters=MergeParameters(density=None, majority_sign_method="total", rank=None, clamp=None, seed=0),
        output=OutputSpec(path="/r/out", kind="adapter", dtype=None),
        device="auto",
        source_path=None,
    )
    assert r.raw == {"adapters": [{"path": "a"}], "output": {"path": "out"}}


def test_full_recipe_reads_every_key():
    r = parse(
        """\
        base: base
        adapters:
          - path: adapters/math
            weight: 0.7
          - path: adapters/code
            weight: -0.3
        strategy: dare_ties_svd
        space: factors
        parameters:
          density: 0.25
          majority_sign_method: frequency
          rank: 8
          clamp: 0.99
          seed: 123
        output:
          path: out/merged
          kind: model
          dtype: float16
        device: cuda:1
        """
    )
    assert r.base == "/r/base"
    # adapters/math does not exist under /r and has one slash: it is a hub id (see docs/recipes.md)
    assert r.adapters == (AdapterSpec("adapters/math", 0.7), AdapterSpec("adapters/code", -0.3))
    assert r.strategy == "dare_ties_svd" and r.space == "factors"
    assert r.parameters == MergeParameters(0.25, "frequency", 8, 0.99, 123)
    assert r.output == OutputSpec("/r/out/merged", "model", "float16")
    assert r.device == "cuda:1"


@pytest.mark.parametrize("alias, name", [("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16"),
                                         ("float32", "float32"), ("bfloat16", "bfloat16")])
def test_dtype_aliases_normalise_to_long_names(alias, name):
    r = parse(MINIMAL + f"  dtype: {alias}\n")
    assert r.output.dtype == name


@pytest.mark.parametrize("device, expected", [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"),
                                              ("cuda:0", "cuda:0"), ("cuda:03", "cuda:3")])
def test_devices(device, expected):
    assert parse(MINIMAL + f"device: {device}\n").device == expected


def test_weights_int_negative_zero_and_yaml12_exponent():
    r = parse(
        """\
        adapters:
          - {path: a, weight: 2}
          - {path: b, weight: -1.5}
          - {path: c, weight: 0}
          - {path: d, weight: 1e-3}
          - {path: e, weight: -.5}
        output: {path: out}
        """
    )
    assert [a.weight for a in r.adapters] == [2.0, -1.5, 0.0, 0.001, -0.5]
    assert all(type(a.weight) is float for a in r.adapters)


def test_null_values_mean_default():
    r = parse(
        """\
        base:
        adapters:
          - {path: a, weight: null}
        strategy: ~
        parameters:
        output: {path: out, dtype: null}
        """
    )
    assert r.base is None and r.strategy == "linear" and r.adapters[0].weight == 1.0
    assert r.parameters == MergeParameters() and r.output.dtype is None


def test_density_one_is_allowed():
    r = parse(MINIMAL + "strategy: ties\nparameters: {density: 1}\n")
    assert r.parameters.density == 1.0


def test_anchors_aliases_and_merge_keys_work_like_safe_load():
    r = parse(
        """\
        adapters:
          - &a {path: a, weight: 0.5}
          - {<<: *a, path: b}
        output: {path: out}
        """
    )
    assert r.adapters == (AdapterSpec("/r/a", 0.5), AdapterSpec("/r/b", 0.5))


def test_recipe_is_frozen_and_hashable():
    r = parse(MINIMAL)
    with pytest.raises(AttributeError):
        r.strategy = "ties"
    assert hash(r) == hash(parse(MINIMAL))


def test_to_dict_is_json_and_round_trips():
    r = parse(
        """\
        base: org/base@main
        adapters:
          - {path: a, weight: 0.5}
          - {path: ./b, weight: -1}
        strategy: dare_linear
        parameters: {density: 0.3, seed: 9}
        output: {path: out, dtype: bf16}
        """
    )
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d == {
        "base": "org/base@main",
        "adapters": [{"path": "/r/a", "weight": 0.5}, {"path": "/r/b", "weight": -1.0}],
        "strategy": "dare_linear",
        "space": "delta",
        "parameters": {"density": 0.3, "seed": 9},
        "output": {"path": "/r/out", "kind": "adapter", "dtype": "bfloat16"},
        "device": "auto",
    }
    assert recipe_from_mapping(d, "/elsewhere") == r


def test_to_dict_lists_only_parameters_the_strategy_uses():
    r = parse(MINIMAL + "strategy: ties\nparameters: {density: 0.5}\n")
    assert r.to_dict()["parameters"] == {"density": 0.5, "majority_sign_method": "total"}
    assert "parameters" not in parse(MINIMAL).to_dict()


def test_recipe_from_mapping_validates_without_line_numbers(tmp_path):
    data = {"adapters": ({"path": "a", "weight": 1},), "output": {"path": "o"}}
    r = recipe_from_mapping(data, tmp_path)
    assert r.adapters == (AdapterSpec(str(tmp_path / "a"), 1.0),)
    assert r.raw == {"adapters": [{"path": "a", "weight": 1}], "output": {"path": "o"}}
    with pytest.raises(RecipeError, match=r"^<recipe>: unknown key 'densty' in parameters; did you mean"):
        recipe_from_mapping({**data, "strategy": "ties", "parameters": {"densty": 0.5}})
    with pytest.raises(RecipeError, match="adapters\\[0\\].weight must be a number, got the string '1'"):
        recipe_from_mapping({"adapters": [{"path": "a", "weight": "1"}], "output": {"path": "o"}})


def test_recipe_error_is_adaptool_error_and_value_error():
    with pytest.raises(ValueError):
        parse("adapters: []\n")
    assert issubclass(RecipeError, AdaptoolError)


# ---------------------------------------------------------------------------------------------
# Every error path: the message names the file, the line, the problem and the fix


def test_unknown_key_with_suggestion_and_line():
    msg = error(
        """\
        adapters:
          - path: a
        strategy: ties
        output:
          path: out
        parameters:
          densty: 0.5
        """
    )
    assert msg == "recipe.yaml:7: unknown key 'densty' in parameters; did you mean 'density'?"


def test_unknown_top_level_key_with_suggestion():
    assert error(MINIMAL + "stratgy: ties\n") == "recipe.yaml:5: unknown key 'stratgy' in the recipe; did you mean 'strategy'?"


def test_unknown_key_without_close_match_lists_allowed_keys():
    msg = error(MINIMAL + "  banana: 1\n")
    assert msg == "recipe.yaml:5: unknown key 'banana' in output; allowed keys: path, kind, dtype"


def test_unknown_key_in_adapter_item():
    msg = error("adapters:\n  - path: a\n    wieght: 0.5\noutput: {path: o}\n")
    assert msg == "recipe.yaml:3: unknown key 'wieght' in adapters[0]; did you mean 'weight'?"


def test_parameter_written_at_top_level_points_to_parameters():
    msg = error(MINIMAL + "density: 0.5\n")
    assert msg == "recipe.yaml:5: unknown key 'density' in the recipe; 'density' belongs under 'parameters:'; indent it there"


def test_bad_strategy_with_suggestion():
    assert error(MINIMAL + "strategy: tie\n") == "recipe.yaml:5: unknown strategy 'tie'; did you mean 'ties'?"
    assert "did you mean 'dare_ties'?" in error(MINIMAL + "strategy: DARE_TIES\n")


def test_bad_strategy_without_close_match_lists_strategies():
    msg = error(MINIMAL + "strategy: average\n")
    assert msg.startswith("recipe.yaml:5: unknown strategy 'average'; use one of: linear, cat, svd, ties, ")


@pytest.mark.parametrize("key, value, expected", [
    ("space", "weights", "recipe.yaml:5: unknown space 'weights'; use one of: delta, factors"),
    ("space", "factor", "recipe.yaml:5: unknown space 'factor'; did you mean 'factors'?"),
    ("device", "gpu", "recipe.yaml:5: unknown device 'gpu'; use one of: auto, cpu, cuda, cuda:N"),
    ("device", "cuda:x", "recipe.yaml:5: unknown device 'cuda:x'; use one of: auto, cpu, cuda, cuda:N"),
])
def test_bad_top_level_choices(key, value, expected):
    assert error(MINIMAL + f"{key}: {value}\n") == expected


def test_bad_output_kind_and_dtype():
    assert error(MINIMAL + "  kind: merged\n") == "recipe.yaml:5: unknown output.kind 'merged'; use one of: adapter, model"
    assert error(MINIMAL + "  dtype: bfloat\n") == "recipe.yaml:5: unknown output.dtype 'bfloat'; did you mean 'bfloat16'?"


def test_bad_majority_sign_method():
    msg = error(MINIMAL + "strategy: ties\nparameters: {density: 0.5, majority_sign_method: count}\n")
    assert msg.startswith("recipe.yaml:6: unknown parameters.majority_sign_method 'count'; use one of: total, frequency")


@pytest.mark.parametrize("density, shown", [("0", "0"), ("1.5", "1.5"), ("-0.1", "-0.1"), ("0.0", "0.0")])
def test_density_out_of_range(density, shown):
    msg = error(MINIMAL + f"strategy: ties\nparameters:\n  density: {density}\n")
    assert msg == (f"recipe.yaml:7: parameters.density must be > 0 and <= 1, got {shown}; "
                   "density is the fraction of each delta kept, e.g. 'density: 0.5'")


@pytest.mark.parametrize("value", ['"0.5"', "high", "{value: 0.5}", "true", ".nan", ".inf"])
def test_density_bad_type(value):
    msg = error(MINIMAL + f"strategy: ties\nparameters:\n  density: {value}\n")
    assert msg.startswith("recipe.yaml:7: parameters.density must be a")


@pytest.mark.parametrize("rank, fragment", [("-1", "must be >= 1, got -1"), ("0", "must be >= 1, got 0"),
                                            ("8.0", "must be a whole number, got the number 8.0"),
                                            ("true", "must be a whole number, got a boolean (true)"),
                                            ('"8"', "must be a whole number, got the string '8'")])
def test_bad_rank(rank, fragment):
    msg = error(MINIMAL + f"strategy: svd\nparameters:\n  rank: {rank}\n")
    assert msg.startswith(f"recipe.yaml:7: parameters.rank {fragment}; ")


@pytest.mark.parametrize("clamp", ["0", "1.01"])
def test_bad_clamp(clamp):
    msg = error(MINIMAL + f"strategy: svd\nparameters: {{clamp: {clamp}}}\n")
    assert msg.startswith(f"recipe.yaml:6: parameters.clamp must be > 0 and <= 1, got {clamp}; ")


@pytest.mark.parametrize("seed", ["-1", "9223372036854775808", "1.5"])
def test_bad_seed(seed):
    msg = error(MINIMAL + f"strategy: dare_linear\nparameters: {{density: 0.5, seed: {seed}}}\n")
    assert msg.startswith("recipe.yaml:6: parameters.seed must be")


@pytest.mark.parametrize("weight, got", [("true", "a boolean (true)"), ("no", "a boolean (false)"),
                                         ('"0.5"', "the string '0.5'"), ("{value: 1}", "a mapping")])
def test_weight_must_be_a_real_number_not_a_bool_or_string(weight, got):
    msg = error(f"adapters:\n  - path: a\n    weight: {weight}\noutput: {{path: o}}\n")
    assert msg == f"recipe.yaml:3: adapters[0].weight must be a number, got {got}; write a number, e.g. 'weight: 0.5'"


@pytest.mark.parametrize("weight", [".inf", "-.inf", ".nan", "1e999"])
def test_weight_must_be_finite(weight):
    msg = error(f"adapters:\n  - path: a\n    weight: {weight}\noutput: {{path: o}}\n")
    assert msg.startswith("recipe.yaml:3: adapters[0].weight must be a finite number")


def test_missing_adapters():
    assert error("strategy: linear\noutput: {path: o}\n").startswith("recipe.yaml:1: missing required key 'adapters'; ")


@pytest.mark.parametrize("text, expected", [
    ("adapters: []\noutput: {path: o}\n", "recipe.yaml:1: adapters is empty; "),
    ("adapters:\noutput: {path: o}\n", "recipe.yaml:1: missing required key 'adapters'; "),
    ("adapters: a\noutput: {path: o}\n", "recipe.yaml:1: adapters must be a list, got the string 'a'; "),
    ("adapters: {path: a}\noutput: {path: o}\n", "recipe.yaml:1: adapters must be a list, got a mapping; "),
    ("adapters:\n  - a\noutput: {path: o}\n", "recipe.yaml:2: adapters[0] must be a mapping with 'path'"),
    ("adapters:\n  - weight: 1\noutput: {path: o}\n", "recipe.yaml:2: adapters[0] has no 'path'; "),
    ("adapters:\n  - path: 3\noutput: {path: o}\n",
     "recipe.yaml:2: adapters[0].path must be a non-empty string, got the number 3; "),
    ("adapters:\n  - path: ''\noutput: {path: o}\n",
     "recipe.yaml:2: adapters[0].path must be a non-empty string, got empty; "),
])
def test_bad_adapters(text, expected):
    assert error(text).startswith(expected)


def test_missing_density_for_every_pruning_strategy():
    for strategy in ("ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune_svd"):
        msg = error(MINIMAL + f"strategy: {strategy}\n")
        assert msg == (f"recipe.yaml:5: strategy '{strategy}' needs parameters.density; "
                       "add 'density: 0.5' (the fraction of each delta kept) under 'parameters:'")


def test_kind_model_needs_base():
    msg = error("adapters: [{path: a}]\noutput:\n  path: o\n  kind: model\n")
    assert msg == ("recipe.yaml:4: output.kind 'model' needs a base model; "
                   "add 'base: <folder or org/name>' at the top level, or use kind: adapter")


def test_kind_model_with_base():
    r = parse("base: org/llama\nadapters: [{path: a}]\noutput: {path: o, kind: model}\n")
    assert r.base == "org/llama" and r.output.kind == "model"


def test_cat_refuses_rank():
    msg = error(MINIMAL + "strategy: cat\nparameters:\n  rank: 8\n")
    assert msg == ("recipe.yaml:7: parameters.rank cannot be used with strategy 'cat'; "
                   "cat's rank is the sum of the adapters' ranks; remove rank, or use svd to choose one")


def test_rank_in_factors_space_only_for_svd_family():
    notes = parse(MINIMAL + "strategy: ties\nspace: factors\nparameters: {density: 0.5, rank: 8}\n").notes
    assert len(notes) == 1
    assert notes[0].startswith("recipe.yaml:7: parameters.rank has no effect with strategy 'ties' in space: factors")
    assert notes[0].endswith("use ties_svd to choose one)")
    assert parse(MINIMAL + "strategy: ties_svd\nspace: factors\nparameters: {density: 0.5, rank: 8}\n").parameters.rank == 8
    assert parse(MINIMAL + "strategy: ties\nparameters: {density: 0.5, rank: 8}\n").parameters.rank == 8


def test_every_strategy_is_allowed_in_factors_space():
    for strategy in STRATEGIES:
        params = "parameters: {density: 0.5}\n" if "density" in parameters_used(strategy) else ""
        assert parse(MINIMAL + f"strategy: {strategy}\nspace: factors\n" + params).space == "factors"


def test_clamp_only_for_svd_family():
    notes = parse(MINIMAL + "strategy: linear\nparameters: {clamp: 0.9}\n").notes
    assert notes == ("recipe.yaml:6: parameters.clamp has no effect with strategy 'linear' (it is read by "
                     "svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd)",)
    assert parse(MINIMAL + "strategy: svd\nparameters: {clamp: 0.9}\n").parameters.clamp == 0.9


@pytest.mark.parametrize("strategy, params, key", [
    ("linear", "density: 0.5", "density"),
    ("dare_linear", "density: 0.5, majority_sign_method: total", "majority_sign_method"),
    ("ties", "density: 0.5, seed: 1", "seed"),
])
def test_parameters_the_strategy_ignores_are_noted(strategy, params, key):
    """A knob the strategy ignores is reported as a note (one recipe can be tried with several strategies)."""
    notes = parse(MINIMAL + f"strategy: {strategy}\nparameters: {{{params}}}\n").notes
    assert len(notes) == 1 and notes[0].startswith(f"recipe.yaml:6: parameters.{key} has no effect with strategy '{strategy}'")


def test_design_contract_example_is_valid(tmp_path):
    """The recipe shape in DESIGN.md's contract, verbatim, parses (seed on ties is only a note)."""
    text = """\
    base: path-or-hub-id            # needed when output.kind is model
    adapters:
      - path: path-or-hub-id
        weight: 0.7                 # any real number, negative allowed; default 1.0
      - path: other
        weight: 0.3
    strategy: ties
    space: delta
    parameters:
      density: 0.5
      majority_sign_method: total
      rank: 16
      seed: 0
    output:
      path: out/merged
      kind: adapter
      dtype: bfloat16
    device: auto
    """
    r = parse(text, base_dir=tmp_path)
    assert r.strategy == "ties" and r.parameters.density == 0.5 and r.parameters.rank == 16
    assert [a.weight for a in r.adapters] == [0.7, 0.3] and r.output.dtype == "bfloat16"
    assert len(r.notes) == 1 and "seed" in r.notes[0]


def test_missing_output_path():
    assert error("adapters: [{path: a}]\n") == (
        "recipe.yaml:1: missing output.path; add 'output:' with 'path: out/merged', or pass -o OUT")
    assert error("adapters: [{path: a}]\noutput:\n  kind: adapter\n").startswith(
        "recipe.yaml:2: missing output.path; ")


def test_output_must_not_overwrite_an_input(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(RecipeError, match=r"recipe.yaml:4: the output folder is the same as adapters\[0\]"):
        parse("adapters: [{path: a}]\noutput:\n  kind: adapter\n  path: ./a/../a\n", tmp_path)


def test_sections_must_be_mappings():
    assert error(MINIMAL + "parameters: 0.5\n").startswith("recipe.yaml:5: parameters must be a mapping, got the number 0.5; ")
    assert error("adapters: [{path: a}]\noutput: out\n").startswith("recipe.yaml:2: output must be a mapping, got the string 'out'; ")


def test_invalid_yaml_reports_line():
    msg = error("adapters:\n  - path: a\n output: {path: o}\n")
    assert msg.startswith("recipe.yaml:3: invalid YAML: ")
    assert msg.endswith("; check indentation and quoting there")
    assert error("adapters: [{path: a}\n").startswith("recipe.yaml:2: invalid YAML: ")


def test_duplicate_keys_are_errors():
    msg = error("adapters: [{path: a}]\noutput: {path: o}\nstrategy: ties\nstrategy: linear\n")
    assert msg == "recipe.yaml:4: key 'strategy' appears twice; keep only one of them"


@pytest.mark.parametrize("text, expected", [
    ("", "recipe.yaml: the recipe is empty; "),
    ("# only a comment\n", "recipe.yaml: the recipe is empty; "),
    ("- path: a\n", "recipe.yaml:1: a recipe must be a mapping of keys, got a list; "),
    ("just text\n", "recipe.yaml: a recipe must be a mapping of keys, got the string 'just text'; "),
    ("1: a\n", "recipe.yaml:1: key 1 in the recipe is not a name; "),
])
def test_empty_or_not_a_mapping(text, expected):
    assert error(text).startswith(expected)


def test_python_objects_are_refused():
    msg = error("adapters: !!python/object/apply:os.system ['echo hacked']\noutput: {path: o}\n")
    assert msg.startswith("recipe.yaml:1: invalid YAML: ")


def test_multiple_documents_are_refused():
    assert error(MINIMAL + "---\n" + MINIMAL).startswith("recipe.yaml:5: invalid YAML: ")


# ---------------------------------------------------------------------------------------------
# Per-module rules and the convention

RULES = """\
adapters:
  - path: a
    weight:
      - match: 'layers\\.[0-7]\\.'
        value: 0.3
      - {match: mlp, value: -2}
      - value: 1
strategy: ties
parameters:
  density: [{match: self_attn, value: 0.7}, {value: 5e-1}]
output: {path: out}
"""


def test_rules_parse_resolve_and_round_trip():
    r = parse(RULES)
    weight = r.adapters[0].weight
    assert weight == ModuleRules((Rule(r"layers\.[0-7]\.", 0.3), Rule("mlp", -2.0), Rule(None, 1.0)))
    assert r.parameters.density == ModuleRules((Rule("self_attn", 0.7), Rule(None, 0.5)))
    assert [weight.at(m) for m in ("model.layers.3.mlp.up_proj", "model.layers.13.mlp.up_proj",
                                   "model.layers.13.self_attn.q_proj", "model.layers.70.self_attn.q_proj")] == [0.3, -2, 1, 1]
    assert weight.index("model.layers.13.mlp.up_proj") == 1
    assert value_at(weight, "x.mlp.y") == -2 and value_at(0.5, "anything") == 0.5 and value_at(None, "x") is None
    d = r.to_dict()
    assert d["adapters"][0]["weight"] == [{"match": r"layers\.[0-7]\.", "value": 0.3}, {"match": "mlp", "value": -2.0},
                                          {"value": 1.0}]
    assert d["parameters"]["density"] == [{"match": "self_attn", "value": 0.7}, {"value": 0.5}]
    assert json.loads(json.dumps(d)) == d and recipe_from_mapping(d, "/elsewhere") == r
    assert hash(r) == hash(parse(RULES))


def test_a_lone_default_rule_is_the_number():
    r = parse("adapters: [{path: a, weight: [{value: 0.25}]}]\noutput: {path: o}\n")
    assert r.adapters == (AdapterSpec("/r/a", 0.25),)


@pytest.mark.parametrize("old, new, expected", [
    ("'layers\\.[0-7]\\.'", "'layers\\.[0-7'",
     "recipe.yaml:4: adapters[0].weight[0].match 'layers\\.[0-7' is not a valid regex (unterminated character set "
     "at position 8); fix the regex (Python re syntax); in YAML, single-quote it, e.g. match: 'layers\\.0\\.'"),
    ("      - value: 1\n", "",
     "recipe.yaml:6: adapters[0].weight has no default rule; end the list with a rule without 'match' (e.g. "
     "'- value: 1.0'), the value of every module no rule matches"),
    ("{match: mlp, value: -2}", "{value: -2}",
     "recipe.yaml:6: adapters[0].weight[1] has no 'match' but is not the last rule; a rule without 'match' is the "
     "default for every module, so it comes last"),
    ("{match: mlp, value: -2}", "{match: mlp}", "recipe.yaml:6: adapters[0].weight[1] has no 'value'; add 'value: X' to the rule"),
    ("{match: mlp, value: -2}", "{match: mlp, value: '-2'}",
     "recipe.yaml:6: adapters[0].weight[1].value must be a number, got the string '-2'; write a number, e.g. 'weight: 0.5'"),
    ("{match: mlp, value: -2}", "{match: mlp, value: true}",
     "recipe.yaml:6: adapters[0].weight[1].value must be a number, got a boolean (true); write a number, e.g. 'weight: 0.5'"),
    ("{match: mlp, value: -2}", "{match: mlp, value: -2, vlaue: 3}",
     "recipe.yaml:6: unknown key 'vlaue' in adapters[0].weight[1]; did you mean 'value'?"),
    ("{match: mlp, value: -2}", "{filter: mlp, value: -2}",
     "recipe.yaml:6: unknown key 'filter' in adapters[0].weight[1]; write 'match: REGEX', a regular expression "
     "searched in the module path (mergekit's 'filter' is a substring)"),
    ("{match: mlp, value: -2}", "{match: 3, value: -2}",
     "recipe.yaml:6: adapters[0].weight[1].match must be a non-empty string, got the number 3; quote it if needed, "
     "e.g. match: \"...\""),
    ("{match: mlp, value: -2}", "0.5",
     "recipe.yaml:6: adapters[0].weight[1] must be a rule {match: REGEX, value: X}, got the number 0.5 (mergekit's "
     "gradients, lists of numbers, are not supported); write rules like [{match: 'layers\\.[0-7]\\.', value: 0.3}, "
     "{value: 1.0}]"),
    ("{match: self_attn, value: 0.7}", "{match: self_attn, value: 0}",
     "recipe.yaml:10: parameters.density[0].value must be > 0 and <= 1, got 0; density is the fraction of each delta "
     "kept, e.g. 'density: 0.5'"),
    ("{match: self_attn, value: 0.7}", "{match: self_attn, value: .nan}",
     "recipe.yaml:10: parameters.density[0].value must be a finite number, got nan; density is the fraction of each "
     "delta kept, e.g. 'density: 0.5'"),
    ("[{match: self_attn, value: 0.7}, {value: 5e-1}]", "[]",
     "recipe.yaml:10: parameters.density is an empty list; write a number, or rules: "
     "[{match: 'layers\\.[0-7]\\.', value: 0.3}, {value: 1.0}]"),
])
def test_bad_rules_name_the_line(old, new, expected):
    assert old in RULES
    assert error(RULES.replace(old, new)) == expected


def test_overlong_rule_regex_is_refused():
    msg = error(RULES.replace("{match: mlp,", "{match: " + "a" * 1001 + ","))
    assert msg.startswith("recipe.yaml:6: adapters[0].weight[1].match 'aaa") and "is 1001 characters long" in msg


def test_convention():
    assert parse(MINIMAL).parameters.convention == "peft"
    r = parse(MINIMAL + "strategy: dare_ties\nparameters: {density: 0.5, convention: mergekit}\n")
    assert r.parameters.convention == "mergekit"
    assert r.to_dict()["parameters"]["convention"] == "mergekit"
    assert "convention" not in parse(MINIMAL + "strategy: ties\nparameters: {density: 0.5}\n").to_dict()["parameters"]
    assert recipe_from_mapping(r.to_dict(), "/x") == r
    assert error(MINIMAL + "strategy: ties\nparameters: {density: 0.5, convention: mergekt}\n") == (
        "recipe.yaml:6: unknown parameters.convention 'mergekt'; did you mean 'mergekit'?")
    assert error(MINIMAL + "strategy: ties\nparameters: {density: 0.5, convention: torch}\n") == (
        "recipe.yaml:6: unknown parameters.convention 'torch'; use one of: peft, mergekit")
    assert error(MINIMAL + "strategy: ties\nspace: factors\nparameters: {density: 0.5, convention: mergekit}\n") == (
        "recipe.yaml:7: parameters.convention 'mergekit' cannot be used with space: factors; space: factors "
        "reproduces PEFT's add_weighted_adapter; use space: delta for mergekit's arithmetic")
    assert error(MINIMAL + "convention: mergekit\n") == (
        "recipe.yaml:5: unknown key 'convention' in the recipe; 'convention' belongs under 'parameters:'; indent it there")
    notes = parse(MINIMAL + "strategy: svd\nparameters: {convention: mergekit}\n").notes
    assert notes == ("recipe.yaml:6: parameters.convention has no effect with strategy 'svd': both conventions "
                     "compute the weighted sum of the deltas (mergekit's task_arithmetic)",)


# ---------------------------------------------------------------------------------------------
# Paths


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "adapters" / "math").mkdir(parents=True)
    (folder / "recipe.yaml").write_text(
        "base: ../models/base\nadapters:\n  - path: adapters/math\n  - path: /abs/lora\noutput: {path: out/x, kind: model}\n"
    )
    monkeypatch.chdir(tmp_path)
    r = load_recipe("recipes/recipe.yaml")
    assert r.base == str(tmp_path / "models" / "base")
    assert r.adapters[0].path == str(folder / "adapters" / "math")  # exists locally: not a hub id
    assert r.adapters[1].path == "/abs/lora"
    assert r.output.path == str(folder / "out" / "x")
    assert r.source_path == str(folder / "recipe.yaml")
    assert r.raw["base"] == "../models/base"


def test_error_messages_name_the_file_as_given(tmp_path, monkeypatch):
    (tmp_path / "recipe.yaml").write_text("adapters: [{path: a}]\noutput: {path: o}\nstrategy: lienar\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as info:
        load_recipe("recipe.yaml")
    assert str(info.value) == "recipe.yaml:3: unknown strategy 'lienar'; did you mean 'linear'?"


def test_hub_ids_pass_through():
    r = parse(
        """\
        base: meta-llama/Llama-3.2-1B
        adapters:
          - path: org/lora@v1.0
          - path: org/lora@refs/pr/3
          - path: ./org/lora
          - path: plainname
          - path: a/b/c
        output: {path: out, kind: model}
        """
    )
    assert r.base == "meta-llama/Llama-3.2-1B"
    assert [a.path for a in r.adapters] == ["org/lora@v1.0", "org/lora@refs/pr/3", "/r/org/lora", "/r/plainname",
                                            "/r/a/b/c"]


def test_existing_local_folder_wins_over_hub_id(tmp_path):
    (tmp_path / "org" / "lora").mkdir(parents=True)
    assert resolve_location("org/lora", tmp_path) == str(tmp_path / "org" / "lora")
    assert resolve_location("org/other", tmp_path) == "org/other"


@pytest.mark.parametrize("value, expected", [
    ("org/name", True), ("org/name@main", True), ("Org-1/na.me_2@v1.2", True), ("org/name@refs/pr/1", True),
    ("name", False), ("./org/name", False), ("/org/name", False), ("org/name/sub", False), ("org/", False),
    ("../name", False), ("org/na..me", False), ("org/name@", False), ("~/name", False),
])
def test_is_hub_id(value, expected):
    assert is_hub_id(value) is expected


def test_output_override_resolves_against_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "recipe.yaml").write_text("adapters: [{path: a}]\noutput: {path: out, dtype: fp16}\n")
    monkeypatch.chdir(tmp_path)
    r = load_recipe(folder / "recipe.yaml", output_override="elsewhere/merged")
    assert r.output == OutputSpec(str(tmp_path / "elsewhere" / "merged"), "adapter", "float16")
    assert r.raw["output"]["path"] == "out"


def test_output_override_makes_output_path_optional(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = parse("adapters: [{path: a}]\n", output_override="o")
    assert r.output == OutputSpec(str(tmp_path / "o"), "adapter", None)
    with pytest.raises(RecipeError, match="output override"):
        parse("adapters: [{path: a}]\n", output_override="")


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="recipe file '.*missing.yaml' not found; check the path"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="is a folder, not a recipe file"):
        load_recipe(tmp_path)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(tmp_path / "bin.yaml")


# ---------------------------------------------------------------------------------------------
# The shipped examples and the import budget


EXAMPLES = sorted(RECIPES.glob("*.yaml"))


def test_there_is_an_example_for_every_strategy_and_for_kind_model():
    loaded = [load_recipe(p) for p in EXAMPLES]
    assert {r.strategy for r in loaded} == set(STRATEGIES)
    assert any(r.output.kind == "model" for r in loaded)
    assert any(r.space == "factors" for r in loaded)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_recipe_loads(path):
    r = load_recipe(path)
    assert r.source_path == str(path)
    assert path.read_text().startswith("# "), "each example starts with a comment saying when to use it"
    assert path.name in (RECIPES / "README.md").read_text()
    for adapter in r.adapters:
        assert os.path.isabs(adapter.path) and adapter.path.startswith(str(RECIPES))


def test_recipe_module_does_not_import_torch():
    code = "import sys, adaptool.recipe; assert 'torch' not in sys.modules and 'yaml' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
