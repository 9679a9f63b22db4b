"""Per-tower head names (``vision.L0H3``, ``text.L3H*``, ``encoder.L1H2``, ``decoder.L0H*``, ``text.cross.L0H1``)
mapped to and from the *global* layer numbers that ``HeadSet`` and the editors use.

A model's editable layers are ``head_slices.output_projections`` in order: encoder-decoders the encoder's
self-attention then the decoder's, dual encoders (CLIP) text then vision, Mllama vision, text self, text cross;
denoisers every attention module. Each has a site (``Site(tower, layer, kind)``, the adapter's own per-tower
numbering, the one captures use); ``editable_sites`` lists them by global index, ``resolve_heads`` turns a spec
into global ``(layer, head)`` pairs, ``tower_names`` writes global pairs back as per-tower names. A tower, kind,
layer or head the model cannot edit raises ``HeadSpecError`` listing the editable towers and their layer counts.
Cross-attention of encoder-decoders (T5/BART ``decoder.cross``) is not a head-plan layer: refused, saying so.

Example:
    >>> import transformers
    >>> from attnscope.probes.tower_heads import editable_sites, resolve_heads, tower_names
    >>> t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(num_layers=2, num_heads=4, d_model=32,
    ...     d_kv=8, d_ff=64, vocab_size=64, decoder_start_token_id=0))
    >>> [str(s) for s in editable_sites(t5)]
    ['encoder.L0.self', 'encoder.L1.self', 'decoder.L0.self', 'decoder.L1.self']
    >>> heads = resolve_heads("encoder.L1H2,decoder.L0H*", t5)
    >>> str(heads), tower_names(heads, t5)
    ('L1H2,L2H0,L2H1,L2H2,L2H3', 'encoder.L1H2,decoder.L0H0,decoder.L0H1,decoder.L0H2,decoder.L0H3')
"""

from typing import Any

from ..errors import AttnscopeError, HeadSpecError
from .adapter import ModelLike, as_adapter, module_of
from .adapters.hf_text import encoder_decoder_tower, is_encoder_decoder
from .head_slices import OutputProjection, _denoiser, output_projections
from .heads import HeadSet, TowerHead, parse_tokens
from .site import Site

_VISION_PARTS = ("vision_tower", "vision_model", "visual", "image_encoder")


def layer_label(site: Site) -> str:
    """``vision.L0`` / ``decoder.cross.L1`` (kind ``self`` left out): the per-tower name of one layer."""
    kind = "" if site.kind == "self" else f"{site.kind}."
    return f"{site.tower}.{kind}L{site.layer}"


def _adapter_sites(model: ModelLike) -> dict[int, Site]:
    """id(attention module) -> Site from the model's adapter (its own per-tower numbering); {} when unknown."""
    candidates = [model]
    denoiser = _denoiser(module_of(model))
    if denoiser is not module_of(model):
        candidates.append(denoiser)
    for candidate in candidates:
        try:
            adapter = as_adapter(candidate)
        except AttnscopeError:
            continue
        for reader in ("_sites", "_routing"):
            method = getattr(adapter, reader, None)
            if callable(method):
                found = method()
                return dict(found[0] if isinstance(found, tuple) else found)
    return {}


def _tower_of_name(model: Any, name: str) -> str:
    if is_encoder_decoder(model):
        return encoder_decoder_tower(name)
    return "vision" if any(part in name.split(".") for part in _VISION_PARTS) else "text"


def editable_sites(model: ModelLike, projections: "list[OutputProjection] | None" = None) -> list[Site]:
    """The site of every editable layer, indexed by global layer (``output_projections`` order).

    Sites come from the model's adapter (the names captures use); layers sharing one module (ALBERT) are named by
    their application; a module the adapter does not name gets ``tower`` from its path, numbered in order.
    """
    projections = projections if projections is not None else output_projections(module_of(model))
    by_id, counters, out = _adapter_sites(model), {}, []
    for proj in projections:
        site = by_id.get(id(proj.attention))
        if site is None:
            tower = _tower_of_name(module_of(model), proj.name)
            site = Site(tower, counters.get(tower, 0), "self")
            counters[tower] = site.layer + 1
        elif proj.application is not None:
            site = Site(site.tower, proj.application, site.kind)
        out.append(site)
    return out


def tower_layers(sites: list[Site]) -> dict[tuple[str, str], list[int]]:
    """``(tower, kind) -> global layers`` in per-tower order (index = the tower's layer number)."""
    groups: dict[tuple[str, str], dict[int, int]] = {}
    for index, site in enumerate(sites):
        groups.setdefault((site.tower, site.kind), {})[site.layer] = index
    return {key: [layers[k] for k in sorted(layers)] for key, layers in groups.items()}


def describe_towers(sites: list[Site]) -> str:
    """``encoder: 2 layers (global L0-L1), decoder: 2 layers (global L2-L3)``: the editable towers and their global
    layers (listed one by one where a tower's layers interleave with another's, as in a UNet)."""
    parts = []
    for (tower, kind), layers in tower_layers(sites).items():
        name = tower if kind == "self" else f"{tower}.{kind}"
        contiguous = layers == list(range(layers[0], layers[0] + len(layers)))
        span = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-L{layers[-1]}" if contiguous \
            else ",".join(f"L{k}" for k in layers)
        parts.append(f"{name}: {len(layers)} layer{'s' * (len(layers) != 1)} (global {span})")
    return ", ".join(parts)


def is_multi_tower(model: ModelLike, projections: "list[OutputProjection] | None" = None) -> bool:
    """Whether the model's editable layers span more than one (tower, kind)."""
    return len(tower_layers(editable_sites(model, projections))) > 1


def _group(token: TowerHead, groups: dict[tuple[str, str], list[int]], sites: list[Site]) -> list[int]:
    key = next((k for k in groups if k[0].lower() == token.tower.lower() and k[1] == token.kind), None)
    if key is not None:
        return groups[key]
    towers = describe_towers(sites)
    if token.kind == "cross" and any(k[0].lower() == token.tower.lower() for k in groups):
        raise HeadSpecError(f"cross-attention of {token.tower!r} is not editable by head plans", expected=towers,
                            got=str(token), fix=f"edit its self-attention ({token.tower}.L<layer>H<head>); "
                            "diffusers cross-attention edits: attnscope.probes.cross_attention_plan")
    raise HeadSpecError("no such editable tower", expected=towers, got=str(token),
                        fix="name one of the towers above, e.g. " + ", ".join(
                            f"{t if k == 'self' else f'{t}.{k}'}.L0H0" for t, k in list(groups)[:3]))


def _layers_of(token: TowerHead, groups: dict[tuple[str, str], list[int]], sites: list[Site]) -> list[int]:
    if token.tower is None:  # global numbering
        layers = list(range(len(sites)))
        where = "the model"
    else:
        layers = _group(token, groups, sites)
        where = layer_label(Site(token.tower, 0, token.kind)).rsplit(".L", 1)[0]
    if token.layer is None:
        return layers
    if token.layer >= len(layers):
        raise HeadSpecError(f"layer out of range in {str(token)!r}", expected=describe_towers(sites), got=str(token),
                            fix=f"{where} has {len(layers)} editable layers, numbered from 0")
    return [layers[token.layer]] if token.tower is not None else [token.layer]


def resolve_heads(spec: str, model: ModelLike, *, select: str = "query",
                  projections: "list[OutputProjection] | None" = None) -> HeadSet:
    """Global ``(layer, head)`` pairs of ``spec`` on ``model`` (tower-qualified and plain tokens; ``*`` sized per
    layer; ``select="kv"``: head indices are KV heads). HeadSpecError for what the model cannot edit."""
    projections = projections if projections is not None else output_projections(module_of(model))
    sites = editable_sites(model, projections)
    groups = tower_layers(sites)
    pairs = []
    for token in parse_tokens(spec):
        for layer in _layers_of(token, groups, sites):
            proj = projections[layer]
            limit = proj.n_kv_heads if select == "kv" else proj.n_heads
            if token.head is not None and token.head >= limit:
                raise HeadSpecError(f"head out of range in {str(token)!r}",
                                    expected=f"{'KV ' if select == 'kv' else ''}head < {limit} in "
                                    f"{layer_label(sites[layer])}", got=str(token),
                                    fix="check `attnscope info --model M`")
            pairs += [(layer, h) for h in ([token.head] if token.head is not None else range(limit))]
    return HeadSet(pairs)


def tower_names(heads: HeadSet, model: ModelLike, projections: "list[OutputProjection] | None" = None) -> str:
    """Global heads written per tower: ``vision.L0H3,text.L1H0`` (HeadSpecError for a layer the model lacks)."""
    sites = editable_sites(model, projections)
    out = []
    for layer, head in heads:
        if layer >= len(sites):
            raise HeadSpecError("layer out of range", expected=describe_towers(sites), got=f"L{layer}H{head}",
                                fix="check `attnscope info --model M`")
        out.append(f"{layer_label(sites[layer])}H{head}")
    return ",".join(out)


def tower_head_column(df: Any, model: ModelLike) -> None:
    """Add ``tower_head`` (``vision.L0H1``) to a per-head table in global numbering (``layer`` / ``head`` columns),
    in place, on models with several editable towers; nothing on the others."""
    projections = output_projections(module_of(model))
    sites = editable_sites(model, projections)
    if len(tower_layers(sites)) < 2 or not len(df):
        return
    df["tower_head"] = [f"{layer_label(sites[int(layer)])}H{int(head)}" if 0 <= int(layer) < len(sites) else ""
                        for layer, head in zip(df["layer"], df["head"])]


__all__ = ["describe_towers", "editable_sites", "is_multi_tower", "layer_label", "resolve_heads", "tower_head_column",
           "tower_layers", "tower_names"]
