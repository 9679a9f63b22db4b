"""``attnscope heatmap --model M --prompt "..." --word W [--word W2] --out fig.png``: DAAM word heat maps.

Runs the diffusion pipeline once on the prompt (seeded), aggregates cross-attention of each word the DAAM way
(``attnscope.circuits.daam``: sum over steps, mean over layers and heads, upsampled, clamped) and writes the
generated image with each word's map over it: ``.png`` (Pillow), ``.html`` (plotly), or ``.parquet`` (the maps
as a ResultTable). ``--preset daam`` reproduces the reference code (castorini/daam: clamp after the step sum,
64x64 or 96x96 maps, no mid block, its spatial-factor filter); the default ``attnscope`` preset keeps every site
at the image size. Aggregation controls: ``--steps-kept``, ``--heads``, ``--upsample``, ``--size``,
``--normalize``.
"""

import argparse
from pathlib import Path

import numpy as np

from ..errors import InputError
from .parsing import int_list

_FORMATS = (".png", ".html", ".parquet")


def _image_of(output) -> np.ndarray | None:
    images = getattr(output, "images", None)
    if images is None:
        return None
    first = images[0]
    array = np.asarray(first.detach().cpu().permute(1, 2, 0) if hasattr(first, "detach") else first)
    return array if array.ndim == 3 and array.shape[-1] in (3, 4) else None


def _write(result, image: np.ndarray | None, words: list[str], out: Path) -> None:
    maps = result.maps[0].numpy()
    if out.suffix == ".parquet":
        table = result.to_table()
        table.save(out)
    elif out.suffix == ".png":
        from ..viz.png import overlay_image, panel_png

        panels = ([overlay_image(np.zeros_like(maps[0]), image, alpha=0.0)] if image is not None else [])
        panels += [overlay_image(m, image) for m in maps]
        labels = (["image"] if image is not None else []) + words
        panel_png(panels, labels, out)
    else:
        from ..viz.images import image_overlay

        parts = [image_overlay(m, image=image, title=f"DAAM: {w!r}").to_html(
            full_html=False, include_plotlyjs="cdn" if i else True) for i, (w, m) in enumerate(zip(words, maps))]
        from .._atomic import atomic_write_text

        atomic_write_text(out, "<html><body>" + "\n".join(parts) + "</body></html>")


def _heatmap(args: argparse.Namespace) -> int:
    from ..circuits.daam import daam_maps
    from ..probes.loading import load

    from .._atomic import check_output
    from .parsing import check_text

    out = check_output(args.out, suffixes=_FORMATS)
    check_text(args.prompt, "--prompt")
    words = [w for spec in args.word for w in spec.split(",") if w.strip()]
    if not words:
        raise InputError("no word given", expected="--word WORD (repeatable)", got=args.word)
    model = load(args.model)
    options = {k: v for k, v in (("upsample", args.upsample), ("normalize", args.normalize)) if v is not None}
    if args.heads:
        options["heads"] = int_list(args.heads, "heads")
    if args.steps_kept:
        options["steps"] = int_list(args.steps_kept, "steps")
    size = args.size or ("daam" if args.preset == "daam" else "image")
    result = daam_maps(model, [args.prompt], words, preset=args.preset, seed=args.seed, size=size,
                       num_inference_steps=args.steps,
                       guidance_scale=args.guidance, pipeline_kwargs={"output_type": "np"}, **options)
    image = _image_of(getattr(result.trace, "output", None))
    _write(result, image, words, out)
    h, w = result.maps.shape[-2:]
    print(f"DAAM heat maps of {args.prompt!r} ({model.name}, {args.steps} steps, seed {args.seed}), {h}x{w}:")
    for word, heat in zip(words, result.maps[0]):
        flat = heat.flatten()
        peak = int(flat.argmax())
        top = flat.sort(descending=True).values[: max(1, flat.numel() // 10)].sum() / flat.sum().clamp_min(1e-12)
        print(f"  {word:>12s}: peak at (y={peak // w}, x={peak % w}), {float(top):.2f} of the heat in the top 10% "
              "of pixels")
    print(f"wrote {out}")
    return 0


EXAMPLES = """examples:
  attnscope heatmap --model zoo:shapes-diffusion --prompt "red circle left blue square right" \\
      --word circle --word square --out daam.png
  attnscope heatmap --model zoo:shapes-diffusion --prompt "red circle left blue square right" --word red,blue \\
      --steps 10 --normalize words --out daam.html
  attnscope heatmap --model zoo:shapes-diffusion --prompt "red circle left" --word circle --preset daam \\
      --out maps.parquet
The output format follows the --out suffix: .png (image and maps), .html (plotly), .parquet (the maps).
"""


def register(sub) -> None:
    p = sub.add_parser("heatmap", help="DAAM per-word cross-attention heat maps of a diffusion model",
                       epilog=EXAMPLES, description="Generate an image from --prompt (seeded) and map where each "
                       "--word's cross-attention lands (DAAM, Tang et al. 2023).")
    p.add_argument("--model", required=True, help="zoo:shapes-diffusion, a diffusers pipeline folder, a hub name")
    p.add_argument("--prompt", required=True, help="the text prompt the image is generated from")
    p.add_argument("--word", action="append", required=True, help="a word of the prompt (repeatable, or a,b)")
    p.add_argument("--out", required=True, help="fig.png | fig.html | maps.parquet (checked before any work)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the "
                   "pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generator (the initial noise)")
    p.add_argument("--steps-kept", help="aggregate only these denoising steps, e.g. 0,1,2 (default: all)")
    p.add_argument("--heads", help="aggregate only these heads of every layer, e.g. 0,3 (default: all)")
    p.add_argument("--preset", choices=("attnscope", "daam"), default="attnscope",
                   help="daam: the reference code's aggregation (clamp after the step sum, 64x64 or 96x96 maps, no "
                   "mid block, its spatial-factor filter; UNet pipelines); attnscope: every site, each step's map "
                   "clamped")
    p.add_argument("--upsample", choices=("bicubic", "bilinear", "nearest"), default=None,
                   help="how maps are resized to the output size (default: bicubic)")
    p.add_argument("--size", choices=("image", "grid", "daam"), default=None,
                   help="map resolution (default: image; with --preset daam, DAAM's 64x64 or 96x96)")
    p.add_argument("--normalize", choices=("none", "max", "minmax", "words", "prompt_tokens"), default=None,
                   help="how maps are normalised (default: none); words: each pixel over the given words; prompt_tokens: over all the "
                   "prompt's tokens (DAAM's normalize=True)")
    p.set_defaults(run=_heatmap)
