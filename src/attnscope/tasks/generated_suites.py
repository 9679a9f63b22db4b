"""Suites made by a generator of ``attnscope.datasets``, fitted to a model: the model's vocabulary size and
tokenizer fill the generator's ``vocab_size`` and ``tokenizer`` when not given, and a zoo organism's card supplies
the data parameters it was trained with (all of them for its own generator, else only ``vocab_size`` / ``bos_id``)
and its held-out seed.

Example:
    >>> from attnscope.tasks.generated_suites import generate
    >>> suite = generate("recall", None, n_items=3, seed=1, params={"n_pairs": 2, "vocab_size": 32})
    >>> suite.generator, len(suite), suite.params["n_pairs"]
    ('associative_recall', 3, 2)
"""

import inspect
from collections.abc import Callable
from typing import Any

from .. import datasets
from ..errors import InputError
from ..probes.adapter import ModelAdapter
from ..probes.capturing import vocab_size_of
from .references import SUITE_NAMES, SuiteRef

# suite name -> generator of attnscope.datasets (the generators' own names are accepted too)
NAMES = {"induction": "induction", "needle": "needle_tokens", "needle-text": "needle_grid",
         "recall": "associative_recall", "mqar": "associative_recall", "ioi": "ioi", "agreement": "agreement",
         "bigram": "bigram_backcopy", "sentences": "sentences"}
GENERATORS = ("agreement", "associative_recall", "bigram_backcopy", "induction", "ioi", "needle", "needle_grid",
              "needle_text", "needle_tokens", "sentences")
_CARD_ANY_GENERATOR = ("vocab_size", "bos_id")  # card parameters every token suite for the organism takes
_NOT_FROM_CARD = ("n_items", "seed", "name")


def generator(name: str) -> tuple[str, Callable[..., Any]]:
    """(generator name, function) of a suite name; InputError for an unknown one."""
    resolved = NAMES.get(name, name)
    if resolved not in GENERATORS:
        raise InputError("unknown suite", expected=f"{', '.join(SUITE_NAMES)}, a generator ({', '.join(GENERATORS)}) or "
                         "a suite .json file", got=name, fix="`attnscope score --help` lists the suites")
    return resolved, getattr(datasets, resolved)


def check_generator_params(ref: SuiteRef) -> None:
    """Validate a generator reference without a model (a sweep spec at parse time): its name and parameters."""
    name, fn = generator(ref.name)
    given = {**ref.params, **_sizes(fn, ref.params.get("n_items", 1))}
    signature = inspect.signature(fn)
    try:
        signature.bind_partial(**given)
    except TypeError as exc:
        raise InputError(f"bad parameters for suite {name!r}", expected=f"{name}{signature}", got=sorted(given),
                         fix=str(exc)) from None
    required = [p.name for p in signature.parameters.values() if p.default is p.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in given]
    if required:
        raise InputError(f"missing parameters for suite {name!r}", expected=required, got=sorted(ref.params))


def generate(name: str, model: ModelAdapter | None, *, n_items: int, seed: int | None,
             params: dict[str, Any]) -> Any:
    """The suite of generator ``name`` (``default``: the zoo organism's own task) with ``params``, fitted to
    ``model`` and its card."""
    card = model.card if model is not None else None
    if name == "default":
        if card is None:
            raise InputError("no default suite for this model", expected="a zoo organism (zoo:NAME)",
                             got=getattr(model, "name", model), fix="name a suite: sentences, induction, recall ...")
        name = card["data"]["generator"]
    gen, fn = generator(name)
    accepted = inspect.signature(fn).parameters
    kwargs = {**_card_params(card, gen, accepted), **params}
    if seed is None:
        seed = int(card["evaluation"].get("seed", 10_000)) if card else 0
    kwargs.update(_model_params(accepted, model, kwargs), **_sizes(fn, n_items), seed=int(seed))
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        raise InputError(f"bad parameters for suite {gen!r}", expected=f"{gen}{inspect.signature(fn)}",
                         got=sorted(kwargs), fix=str(exc)) from None
    return fn(**kwargs)


def _sizes(fn: Callable[..., Any], n: int) -> dict[str, int]:
    return {"n_per_cell" if "n_per_cell" in inspect.signature(fn).parameters else "n_items": int(n)}


def _card_params(card: dict | None, gen: str, accepted: Any) -> dict[str, Any]:
    if not card:
        return {}
    data = card.get("data", {})
    params = {k: v for k, v in dict(data.get("params", {})).items() if k not in _NOT_FROM_CARD}
    if data.get("generator") != gen:
        params = {k: v for k, v in params.items() if k in _CARD_ANY_GENERATOR}
    return {k: v for k, v in params.items() if k in accepted}


def _model_params(accepted: Any, model: ModelAdapter | None, given: dict[str, Any]) -> dict[str, Any]:
    """The model's vocabulary size and tokenizer for the generator parameters that take them (when not given)."""
    out: dict[str, Any] = {}
    if model is None:
        return out
    if "tokenizer" in accepted and "tokenizer" not in given:
        out["tokenizer"] = model.tokenizer
    vocab = vocab_size_of(model.module)
    if "vocab_size" in accepted and vocab is not None:
        if "vocab_size" in given and int(given["vocab_size"]) > vocab:
            raise InputError("suite vocab_size larger than the model's vocabulary", expected=f"<= {vocab}",
                             got=given["vocab_size"], fix=f"leave vocab_size out (the model's {vocab}) or lower it")
        out["vocab_size"] = given.get("vocab_size", vocab)
    return out
