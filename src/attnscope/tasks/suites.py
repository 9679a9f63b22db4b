"""Prompt suites by name: the one resolver the CLI, sweeps and the dashboard share.

A ``SuiteRef`` names a suite file or a suite with parameters. Names: ``induction``, ``needle`` (token needles),
``needle-text`` (a grid of text needles), ``recall`` (associative recall / MQAR), ``ioi``, ``agreement``,
``bigram`` (Bigram-Backcopy), ``sentences``, ``shapes`` (VQA for a VLM, captions for a diffusion pipeline),
``images`` (shapes scenes as ``pixel_values`` for a vision encoder), ``latents`` (noisy latents and velocity
targets for a Flux / SD3 denoiser), ``default`` (a zoo organism's own task; ``images`` / ``latents`` for a vision
encoder / denoiser), and every generator of ``attnscope.datasets`` by its function name
(``attnscope.tasks.generated_suites`` fits them to the model).

Example:
    >>> from attnscope.tasks.suites import build_suite
    >>> suite = build_suite("recall", n_items=3, seed=1, n_pairs=2, vocab_size=32)
    >>> suite.generator, len(suite), suite.params["n_pairs"]
    ('associative_recall', 3, 2)
"""

import inspect
from pathlib import Path
from typing import Any

from ..datasets import PromptSuite, ShapesVLMSuite, shapes_scenes
from ..datasets.image_suite import image_suite
from ..datasets.latent_suite import FLOW_DENOISERS, latent_suite
from ..errors import InputError
from ..probes.adapter import ModelAdapter
from ..probes.capturing import vocab_size_of
from .generated_suites import check_generator_params, generate
from .references import SuiteRef
from .._progress import stage


def check_suite_params(ref: SuiteRef) -> None:
    """Validate a reference without a model (a sweep spec at parse time): the name and the parameter names."""
    if ref.path:
        if not Path(ref.path).is_file():
            raise InputError("suite file not found", expected="a PromptSuite JSON file", got=ref.path)
        if ref.params:
            raise InputError("a suite file takes no generator parameters", expected="only path and label",
                             got=sorted(ref.params))
    elif ref.name in INPUT_SUITES:
        accepted = list(inspect.signature(INPUT_SUITES[ref.name]).parameters)[1:]  # after the model
        unknown = sorted(set(ref.params) - set(accepted))
        if unknown:
            raise InputError(f"bad parameters for suite {ref.name!r}", expected=accepted,
                             got=unknown, fix="see attnscope.datasets.image_suite / latent_suite")
    elif ref.name not in ("shapes", "default"):
        check_generator_params(ref)


def build_suite(ref: "SuiteRef | str", model: ModelAdapter | None = None, *, n_items: int | None = None,
                seed: int | None = None, **params: Any) -> Any:
    """The suite ``ref`` names, fitted to ``model`` (a suite file's token ids are checked against its vocabulary).
    ``n_items``, ``seed`` and ``params`` are defaults that the reference's own parameters override."""
    ref = SuiteRef.parse(ref) if isinstance(ref, str) else ref
    stage(f"building suite {ref}")
    merged = {**params, **ref.params}
    n = int(merged.pop("n_items", n_items if n_items is not None else 64))
    seed = merged.pop("seed", seed)
    if ref.path:
        if merged:
            raise InputError("a suite file takes no generator parameters", expected="only path and label",
                             got=sorted(merged))
        suite = PromptSuite.from_json(Path(ref.path))
        if model is not None:
            check_suite_ids(suite, model)  # a file may hold ids of another vocabulary; generated suites fit
        return suite
    if ref.name == "shapes":
        return shapes_suite(model, n, 0 if seed is None else int(seed))
    name = ref.name
    if name == "default" and model is not None and model.card is None:  # the organism's task: generate("default")
        name = default_input_suite(model) or "sentences"
    if name in INPUT_SUITES:
        if model is None:
            raise InputError(f"the {name} suite is built for a model", expected="a model", got=None,
                             fix="pass the model the suite is for")
        return INPUT_SUITES[name](model, n_items=n, seed=0 if seed is None else int(seed), **merged)
    return generate(name, model, n_items=n, seed=seed, params=merged)


INPUT_SUITES = {"images": image_suite, "latents": latent_suite}  # suites of model inputs that are not token ids


def default_input_suite(model: ModelAdapter) -> str | None:
    """``images`` for a vision encoder, ``latents`` for a Flux / SD3 denoiser, else None (a token suite)."""
    module = model.module
    if type(module).__name__ in FLOW_DENOISERS:
        return "latents"
    config = getattr(module, "config", None)
    if getattr(module, "main_input_name", None) == "pixel_values" and getattr(config, "image_size", None):
        return "images"
    return None


def check_suite_ids(suite: Any, model: ModelAdapter) -> None:
    """InputError when a suite item holds token ids outside the model's vocabulary (before any work starts)."""
    vocab = vocab_size_of(model.module)
    if vocab is None or not hasattr(suite, "items"):
        return
    for index, item in enumerate(suite.items):
        for field in ("ids", "answer_ids", "corrupt_ids"):
            ids = getattr(item, field, None) or []
            bad = [i for i in ids if not 0 <= int(i) < vocab]
            if bad:
                raise InputError("suite token ids outside the model's vocabulary", expected=f"0 <= id < {vocab}",
                                 got=f"item {index} {field}: {bad[:3]}", fix="build the suite for this model's "
                                 "vocabulary (vocab_size) or pick the model the suite was made for")


class PromptList(list):
    """Prompts of a text-to-image suite, with a name (what pipeline analyses such as ``hrv`` take)."""

    def __init__(self, name: str, prompts: list[str]):
        super().__init__(prompts)
        self.name, self.prompts = name, list(prompts)


def shapes_suite(model: ModelAdapter | None, n_items: int, seed: int) -> Any:
    """Shapes for the model's family: VQA examples (VLMs) or scene captions (diffusion pipelines)."""
    family = model.info().family if model is not None else None
    if family == "vlm":
        return ShapesVLMSuite(model, n_items=n_items, seed=seed)
    if family is not None and family.startswith("diffusers-pipeline"):
        return PromptList(f"shapes captions(n={n_items}, seed={seed})",
                          [s.caption for s in shapes_scenes(n_items, seed=seed)])
    raise InputError("the shapes suite needs a VLM or a diffusion pipeline", expected="family vlm or "
                     "diffusers-pipeline", got=family, fix="use a text suite for text models")
