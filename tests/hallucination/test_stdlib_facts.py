"""stdlib-facts: the facts agree with inspect, the checker labels answers, the draw is deterministic."""

import ast
import importlib
import inspect
import json

import pytest

from notelab.core.errors import ConfigError
from notelab.data.text import stdlib_root
from notelab.hallucination import stdlib_facts as sf

MODULES = ("textwrap", "shlex", "fnmatch", "base64", "json")


def _functions(module):
    path = stdlib_root() / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = stdlib_root() / module.replace(".", "/") / "__init__.py"
    return sf.read_functions(path, module)


@pytest.mark.parametrize("module", MODULES)
def test_facts_equal_what_inspect_reports(module):
    mod = importlib.import_module(module)
    functions = _functions(module)
    assert functions
    for f in functions:
        sig = inspect.signature(getattr(mod, f.name))
        names = []
        for p in sig.parameters.values():
            prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
            names.append(prefix + p.name)
        assert list(f.params) == names, f.name
        for param, text in f.defaults:
            assert ast.literal_eval(text) == sig.parameters[param].default
        assert getattr(mod, f.name).__module__ == module


def test_prompts_and_answers_of_a_known_function():
    (dedent,) = [f for f in _functions("textwrap") if f.name == "dedent"]
    (wrap,) = [f for f in _functions("textwrap") if f.name == "wrap"]
    facts = {(x.kind, x.param): x for x in sf.facts_of(wrap)}
    params = facts[("params", "")]
    assert params.prompt.startswith("# textwrap\n") and params.prompt.endswith("def wrap(")
    assert params.answer == "text, width, **kwargs"
    default = facts[("default", "width")]
    assert default.prompt.endswith("def wrap(text, width=") and default.answer == "70"
    assert facts[("module", "")].answer == "textwrap"
    assert [x.answer for x in sf.facts_of(dedent, ["params"])] == ["text"]


def test_checker_labels_completions():
    (wrap,) = [f for f in _functions("textwrap") if f.name == "wrap"]
    facts = {(x.kind, x.param): x for x in sf.facts_of(wrap)}
    p, d, m = facts[("params", "")], facts[("default", "width")], facts[("module", "")]
    assert sf.is_correct(p, "text, width=70, **kwargs):\n    w = TextWrapper(")
    assert sf.is_correct(p, "text: str, width: int = 70, **kwargs) -> list:")
    assert not sf.is_correct(p, "text, width=70):")  # a parameter missing
    assert not sf.is_correct(p, "text, kwargs, width")  # never closes: no answer
    assert sf.is_correct(d, "70, **kwargs):") and not sf.is_correct(d, "80, **kwargs):")
    assert not sf.is_correct(d, "70.0)")  # a float is another value than the int 70
    assert sf.is_correct(m, "textwrap'\n>>>") and not sf.is_correct(m, "string'")
    assert sf.hallucinated([p, d, m], ["text, width=70, **kwargs):", "", "textwrap'"]) == [False, True, False]
    assert sf.stop_text(p, "text, width=70, **kwargs):\n    more") == "text, width=70, **kwargs)"
    assert sf.stop_text(d, "70, **kwargs):") == "70"
    with pytest.raises(ConfigError, match="one completion per fact"):
        sf.hallucinated([p], [])


def test_string_defaults_compare_as_values():
    fact = sf.Fact("default", "m", "f", "q", "def f(sep=", "' '", "sep")
    assert sf.is_correct(fact, '" ")') and not sf.is_correct(fact, "',')")


def test_draw_is_deterministic_and_limited_to_the_files_read():
    a = sf.stdlib_facts(20, seed=3, max_chars=300_000)
    assert a == sf.stdlib_facts(20, seed=3, max_chars=300_000)
    assert a != sf.stdlib_facts(20, seed=4, max_chars=300_000)
    modules = {m for _, m in sf.stdlib_modules("train", 300_000)}
    assert {f.module for f in a} <= modules
    assert all(f.kind in sf.KINDS for f in a)
    with pytest.raises(ConfigError, match="kinds"):
        sf.stdlib_facts(5, kinds=["colour"])


def test_knowledge_source_holds_each_signature(tmp_path):
    path = sf.write_knowledge(tmp_path / "kb", split="train", max_chars=100_000)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    functions = sf.stdlib_function_facts("train", 100_000)
    assert len(rows) == len(functions) > 0
    for row, f in zip(rows, functions):
        assert row["source"] == f"{f.module}.{f.name}"
        assert f"def {f.name}(" in row["text"]
    with pytest.raises(ConfigError, match="expected a folder"):
        sf.write_knowledge(path, max_chars=100_000)
