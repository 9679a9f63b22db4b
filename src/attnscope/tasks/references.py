"""References by name, parsed once at the edge: ``ModelRef`` (``--model``, a sweep's ``model:``, the dashboard's
model box) and ``SuiteRef`` (``--suite``, a sweep's ``suites:`` entry). Nothing below this module parses them.

Example:
    >>> from attnscope.tasks.references import ModelRef, SuiteRef
    >>> ModelRef.parse("zoo:induction-2l"), ModelRef.parse("./my-model").kind
    (ModelRef(kind='zoo', name='induction-2l'), 'source')
    >>> str(ModelRef.parse("zoo:induction-2l"))
    'zoo:induction-2l'
    >>> SuiteRef.parse("induction"), SuiteRef.parse({"generator": "recall", "n_pairs": 4}).params
    (SuiteRef(name='induction', path=None, params={}), {'n_pairs': 4})
    >>> SuiteRef.parse("suites/my.json").path
    'suites/my.json'
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InputError

ZOO_PREFIX = "zoo:"
# suite names every front end offers (attnscope.tasks.suites builds them; its generators' own names work too)
SUITE_NAMES = ("induction", "needle", "needle-text", "recall", "mqar", "ioi", "agreement", "bigram", "sentences",
               "shapes", "images", "latents", "default")


@dataclass(frozen=True)
class ModelRef:
    """A model named on the command line or in a spec: a zoo organism, or a source that ``attnscope.models.load``
    resolves (a built-in name such as ``minilm``, a local folder or a hub name)."""

    kind: Literal["zoo", "source"]
    name: str

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        text = str(text).strip()
        if not text:
            raise InputError("empty model reference", expected="minilm, zoo:NAME, a folder or a hub name", got=text,
                             fix="`attnscope models` lists the names")
        if text.startswith(ZOO_PREFIX):
            name = text[len(ZOO_PREFIX):]
            if not name:
                raise InputError("zoo reference without a name", expected="zoo:NAME", got=text,
                                 fix="`attnscope zoo list` lists the organisms")
            return cls("zoo", name)
        return cls("source", text)

    def __str__(self) -> str:
        return f"{ZOO_PREFIX}{self.name}" if self.kind == "zoo" else self.name


@dataclass(frozen=True)
class SuiteRef:
    """A prompt suite: a saved suite file (``path``) or a suite name with generator parameters."""

    name: str
    path: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: "str | Mapping[str, Any]") -> "SuiteRef":
        """``"induction"``, ``"my_suite.json"``, or a mapping ``{generator: NAME, ...params}`` /
        ``{path: FILE}`` (a sweep spec's entry; ``params:`` may nest the parameters)."""
        if isinstance(value, str):
            if not value.strip():
                raise InputError("empty suite reference", expected="a suite name or a .json file", got=value)
            return cls(value, path=value) if value.endswith(".json") else cls(value)
        if not isinstance(value, Mapping):
            raise InputError("a suite must be a name or a mapping", expected="{generator: induction, n_items: 8} "
                             "or {path: suite.json}", got=type(value).__name__)
        params = {**dict(value.get("params") or {}),
                  **{k: v for k, v in value.items() if k not in ("generator", "path", "label", "params")}}
        if value.get("path"):
            return cls(str(value["path"]), path=str(value["path"]), params=params)
        if not value.get("generator"):
            raise InputError("a suite mapping needs generator or path", expected="generator: NAME or path: FILE",
                             got=sorted(value))
        return cls(str(value["generator"]), params=params)

    def __str__(self) -> str:
        return self.path or self.name
