"""stdlib-facts: a fact benchmark that runs anywhere, labelled without a human.

Questions are generated from the Python standard library's own source (the corpus notelab's
language models pre-train on, :mod:`notelab.data.text`), about facts the source states exactly and
``inspect`` reports for the same function:

    params   ``def NAME(``                       -> the parameter names in order   (``inspect.signature``)
    default  ``def NAME(a, b, PARAM=``           -> PARAM's default (a literal)    (``Parameter.default``)
    module   ``>>> NAME.__module__\\n'``          -> the module defining NAME       (``__module__``)

Each prompt is code-shaped, as the model saw the text in pre-training, with the module in context
(a ``# module`` line and the source lines just above the ``def``). A completion is judged by
:func:`is_correct` against the known answer, so each answer is *correct* or *hallucinated* with no
human in the loop (the extrinsic hallucination of the note: output not grounded in what the training
data says). Facts are read with :mod:`ast`, never by importing the module (importing arbitrary
stdlib modules has side effects); a test checks the facts against ``inspect`` on importable ones.

The knowledge source for retrieval (RAG, FActScore) is the same stdlib as text, one passage per
function: its module, its signature and its docstring summary (:func:`write_knowledge`).
"""

from __future__ import annotations

import ast
import json
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from notelab.core.errors import ConfigError, DataError
from notelab.core.io import atomic_write_text
from notelab.data.text import stdlib_files, stdlib_root

KINDS = ("params", "default", "module")
KNOWLEDGE_FILE = "stdlib_knowledge.jsonl"


@dataclass(frozen=True)
class Fact:
    """One question with its exact answer."""

    kind: str  # one of KINDS
    module: str  # dotted module name, e.g. "json.decoder"
    name: str  # the function, e.g. "py_scanstring"
    question: str  # the question in words (for chat models and reports)
    prompt: str  # the code-shaped prompt a base model completes
    answer: str  # the exact answer, in the form the completion should spell it
    param: str = ""  # for "default": the parameter asked about


@dataclass(frozen=True)
class FunctionFacts:
    """What the source says about one module-level function (the raw material of its facts)."""

    module: str
    name: str
    params: tuple[str, ...]  # "*args" / "**kw" marked as in a call signature; no bare "*" or "/"
    defaults: tuple[tuple[str, str], ...]  # (parameter, default's source text) for literal defaults
    header: str  # the signature's source text, "def name(...):"
    context: str  # up to a few source lines above the def
    summary: str  # the docstring's first line ("" when none)


# ------------------------------------------------------------------------------------------- reading


def _param_names(args: ast.arguments) -> list[str]:
    names = [a.arg for a in [*args.posonlyargs, *args.args]]
    if args.vararg is not None:
        names.append("*" + args.vararg.arg)
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg is not None:
        names.append("**" + args.kwarg.arg)
    return names


def _literal_defaults(args: ast.arguments, source: str) -> list[tuple[str, str]]:
    """(parameter, source text) of each default that is a plain literal (``ast.literal_eval`` reads it
    back to the value ``inspect`` reports)."""
    positional = [*args.posonlyargs, *args.args]
    pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    out = []
    for a, d in pairs:
        text = ast.get_source_segment(source, d)
        if text is None or "\n" in text or len(text) > 24:
            continue
        try:
            ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue
        out.append((a.arg, text))
    return out


def _module_name(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")


def read_functions(path: Path, module: str, context_lines: int = 3) -> list[FunctionFacts]:
    """The public, undecorated module-level functions of one source file (decorators can change a
    signature, so ``inspect`` and the source would disagree)."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, OSError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_") or node.decorator_list:
            continue
        body_line = node.body[0].lineno - 1
        header = "\n".join(lines[node.lineno - 1 : body_line]).strip()
        if not header.startswith("def ") or not header.endswith(":") or not header.isascii():
            continue  # a one-line body on the def line, or non-ASCII text: skipped
        above = [ln for ln in lines[max(0, node.lineno - 1 - context_lines) : node.lineno - 1] if ln.strip()]
        doc = ast.get_docstring(node) or ""
        out.append(
            FunctionFacts(
                module=module,
                name=node.name,
                params=tuple(_param_names(node.args)),
                defaults=tuple(_literal_defaults(node.args, source)),
                header=header,
                context="\n".join(above),
                summary=doc.strip().splitlines()[0].strip() if doc.strip() else "",
            )
        )
    return out


def stdlib_modules(
    split: str = "train", max_chars: int | None = None, seed: int | None = None, with_functions: bool = False
) -> list[tuple[Path, str]]:
    """(file, module) of the stdlib files of ``split`` up to ``max_chars`` characters of whole files
    (file sizes in bytes; the stdlib is nearly all ASCII): in the order the corpus reads them, so the
    files a model trained on ``max_chars`` characters of that split has seen; or, with ``seed``, in a
    seeded random order (a small corpus of varied modules, :func:`module_texts`). ``with_functions``:
    only files that define a function :func:`read_functions` asks about (a small corpus is then all
    material for questions)."""
    root = stdlib_root()
    files = stdlib_files(split)
    if seed is not None:
        random.Random(seed).shuffle(files)
    out, total = [], 0
    for path in files:
        size = path.stat().st_size
        if max_chars is not None and total + size > max_chars:
            if seed is None:
                break
            continue  # a random order: a smaller file further on may still fit
        module = _module_name(path, root)
        if with_functions and not read_functions(path, module):
            continue
        total += size
        out.append((path, module))
    return out


def module_texts(modules: Sequence[tuple[Path, str]]) -> list[str]:
    """The source text of each module (a pre-training corpus that holds exactly those facts)."""
    return [path.read_text(encoding="utf-8") for path, _ in modules]


def iter_function_facts(modules: Iterable[tuple[Path, str]]) -> Iterator[FunctionFacts]:
    """The functions :func:`read_functions` finds in ``modules``, in order; a name defined in two modules
    is kept once (first module), so a ``module`` answer is unique."""
    seen: set[str] = set()
    for path, module in modules:
        for f in read_functions(path, module):
            if f.name not in seen:
                seen.add(f.name)
                yield f


def stdlib_function_facts(
    split: str = "train", max_chars: int | None = None, modules: Sequence[tuple[Path, str]] | None = None
) -> list[FunctionFacts]:
    """Every function of ``modules`` (default :func:`stdlib_modules` of ``split`` / ``max_chars``)."""
    return list(iter_function_facts(stdlib_modules(split, max_chars) if modules is None else modules))


# ------------------------------------------------------------------------------------ the questions


def _prefix(f: FunctionFacts) -> str:
    return f"# {f.module}\n" + (f.context + "\n" if f.context else "")


def facts_of(f: FunctionFacts, kinds: Sequence[str] = KINDS) -> Iterator[Fact]:
    """The questions one function gives: its parameters, each literal default, its module."""
    qual = f"{f.module}.{f.name}"
    if "params" in kinds and f.params:
        yield Fact(
            "params",
            f.module,
            f.name,
            f"What are the parameters of {qual}, in order?",
            _prefix(f) + f"def {f.name}(",
            ", ".join(f.params),
        )
    if "default" in kinds:
        for param, text in f.defaults:
            # The prompt is the source header up to "param=": the question, as the model read it.
            cut = _default_cut(f.header, param)
            if cut is None:
                continue
            yield Fact(
                "default",
                f.module,
                f.name,
                f"What is the default value of the parameter {param} of {qual}?",
                _prefix(f) + cut,
                text,
                param,
            )
    if "module" in kinds:
        yield Fact(
            "module",
            f.module,
            f.name,
            f"Which standard-library module defines the function {f.name}?",
            f">>> {f.name}.__module__\n'",
            f.module,
        )


def _default_cut(header: str, param: str) -> str | None:
    """``header`` up to and including ``param=`` (annotations allowed: ``param: int =``)."""
    for sep in (f"{param}=", f"{param} ="):
        at = header.find(sep)
        while at > 0 and (header[at - 1].isalnum() or header[at - 1] == "_"):
            at = header.find(sep, at + 1)  # "xparam=" is another parameter
        if at > 0:
            return header[: at + len(sep)]
    return None


def stdlib_facts(
    n: int | None = None,
    seed: int = 0,
    split: str = "train",
    max_chars: int | None = None,
    kinds: Sequence[str] = KINDS,
    modules: Sequence[tuple[Path, str]] | None = None,
) -> list[Fact]:
    """``n`` facts (all when None) drawn without replacement, deterministic for ``seed``, from the
    functions of ``modules`` (default: the stdlib files a model trained on ``split`` / ``max_chars``
    has read). With ``n`` given, the modules are read in a seeded order only until ``4 n`` facts are
    found (parsing the whole stdlib takes seconds), and the ``n`` are drawn from those."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ConfigError(f"kinds: expected a non-empty subset of {', '.join(KINDS)}, got {list(kinds)}")
    if n is not None and n < 1:
        raise ConfigError(f"n: expected a positive number of facts, got {n}")
    modules = list(stdlib_modules(split, max_chars) if modules is None else modules)
    if n is not None:
        random.Random(seed).shuffle(modules)
    facts: list[Fact] = []
    for f in iter_function_facts(modules):
        facts.extend(facts_of(f, kinds))
        if n is not None and len(facts) >= 4 * n:
            break
    if not facts:
        raise DataError(f"stdlib {split} split (max_chars {max_chars}): expected functions to ask about, found none")
    random.Random(seed).shuffle(facts)
    return facts if n is None else facts[:n]


# --------------------------------------------------------------------------------------- the checker


def _until_close(text: str) -> str | None:
    """``text`` up to the ``)`` closing an already open parenthesis (None when it never closes)."""
    depth = 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                return text[:i]
            depth -= 1
    return None


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets and string quotes (good enough for signatures)."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_params(completion: str) -> list[str] | None:
    """The parameter names of a completion of ``def name(``: up to the closing ``)``, annotations and
    defaults dropped, the bare ``*`` and ``/`` markers dropped; None when the parenthesis never closes."""
    inside = _until_close(completion)
    if inside is None:
        return None
    names = []
    for part in _split_top(inside):
        name = part.split("=", 1)[0].split(":", 1)[0].strip()
        if name and name not in ("*", "/"):
            names.append(name)
    return names


def parse_default(completion: str) -> str:
    """The default's text in a completion of ``... param=``: up to the next top-level ``,`` or ``)``."""
    inside = _until_close(completion)
    return _split_top(completion if inside is None else inside)[0].strip()


def extract_answer(fact: Fact, completion: str) -> str:
    """The answer a completion gives, in the form of ``fact.answer`` ("" when it gives none)."""
    if fact.kind == "params":
        names = parse_params(completion)
        return "" if names is None else ", ".join(names)
    if fact.kind == "default":
        return parse_default(completion)
    return completion.split("'", 1)[0].strip() if "'" in completion else ""


def is_correct(fact: Fact, completion: str) -> bool:
    """Whether ``completion`` (the text generated after ``fact.prompt``) states the fact.

    Defaults are compared as values (``ast.literal_eval``), so ``"x"`` and ``'x'`` agree.
    """
    answer = extract_answer(fact, completion)
    if fact.kind != "default":
        return answer == fact.answer
    try:
        given, truth = ast.literal_eval(answer), ast.literal_eval(fact.answer)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False
    return type(given) is type(truth) and given == truth


def hallucinated(facts: Sequence[Fact], completions: Sequence[str]) -> list[bool]:
    """Per fact, True when its completion does not state it (an empty or unparsable answer counts)."""
    if len(facts) != len(completions):
        raise ConfigError(f"expected one completion per fact, got {len(completions)} for {len(facts)} facts")
    return [not is_correct(f, c) for f, c in zip(facts, completions)]


def stop_text(fact: Fact, completion: str) -> str:
    """The completion cut where its answer ends (``)`` of the signature, the default, the quote), so
    detectors score the answer and not what the model rambles on about after it."""
    if fact.kind == "module":
        head, quote, _ = completion.partition("'")
        return head + quote
    inside = _until_close(completion)
    if inside is None:
        return completion
    if fact.kind == "default":
        return _split_top(inside)[0]
    return inside + ")"


# -------------------------------------------------------------------------------- knowledge source


def knowledge_rows(functions: Sequence[FunctionFacts]) -> list[dict[str, str]]:
    """One retrieval passage per function: ``{"text", "source"}`` with its module, signature and summary."""
    rows = []
    for f in functions:
        text = f"{f.module}.{f.name}: {' '.join(f.header.split())}"
        if f.summary:
            text += f" {f.summary}"
        rows.append({"text": text, "source": f"{f.module}.{f.name}"})
    return rows


def write_knowledge(
    folder: str | os.PathLike,
    split: str = "all",
    max_chars: int | None = None,
    modules: Sequence[tuple[Path, str]] | None = None,
) -> Path:
    """Write the stdlib knowledge source (of ``modules``, default the ``split`` / ``max_chars`` ones) as
    ``folder/stdlib_knowledge.jsonl`` (the JSONL layout :meth:`notelab.data.retrieval.BM25Index.from_folder`
    reads); returns the file."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"knowledge folder: expected a folder, got the file {folder}")
    rows = knowledge_rows(stdlib_function_facts(split, max_chars, modules))
    if not rows:
        raise DataError(f"stdlib {split} split: expected functions for the knowledge source, found none")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / KNOWLEDGE_FILE
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def fact_to_json(fact: Fact) -> dict[str, str]:
    return asdict(fact)


__all__ = [
    "KINDS",
    "Fact",
    "FunctionFacts",
    "extract_answer",
    "fact_to_json",
    "facts_of",
    "hallucinated",
    "is_correct",
    "iter_function_facts",
    "knowledge_rows",
    "module_texts",
    "parse_default",
    "parse_params",
    "read_functions",
    "stdlib_facts",
    "stdlib_function_facts",
    "stdlib_modules",
    "stop_text",
    "write_knowledge",
]
