"""``attnscope heatmap --model M --prompt "..." --word W [--word W2] --out fig.png``: DAAM word heat maps.

Runs the diffusion pipeline once on the prompt (seeded), aggregates cross-attention of each word the DAAM way
(``attnscope.circuits.daam``: sum over steps, mean over layers and heads, upsampled, clamped) and writes the
generated image with each word's map over it: ``.png`` (Pillow), ``.html`` (plotly), or ``.parquet`` (the maps
as a ResultTable). ``--preset daam`` reproduces the reference code (castorini/daam: clamp after the step sum,
64x64 or 96x96 maps, no mid block, its spatial-factor filter); the default ``attnscope`` preset keeps every site
at the image size. Aggregation controls: ``--steps-kept``, ``--heads``, ``--upsample``, ``--size``,
``--normalize``. The flags become a ``HeatmapRequest``; the work is ``attnscope.tasks.heatmap_job``.
"""

import argparse

from ..errors import InputError
from ..tasks.references import ModelRef
from .parsing import check_text, int_list


def request_of(args: argparse.Namespace) -> "HeatmapRequest":  # noqa: F821 (imported when the command runs)
    """The ``HeatmapRequest`` of the command line (``--word a,b`` may name several words)."""
    from ..tasks.heatmap_job import HeatmapRequest

    prompt = check_text(args.prompt, "--prompt")
    words = [w for spec in args.word for w in spec.split(",") if w.strip()]
    if not words:
        raise InputError("no word given", expected="--word WORD (repeatable)", got=args.word)
    heads, steps_kept = int_list(args.heads, "heads"), int_list(args.steps_kept, "steps")
    return HeatmapRequest(ModelRef.parse(args.model), prompt, words, args.out, steps=args.steps,
                          guidance=args.guidance, seed=args.seed, steps_kept=steps_kept, heads=heads,
                          preset=args.preset, upsample=args.upsample, size=args.size, normalize=args.normalize)


def _heatmap(args: argparse.Namespace) -> int:
    from ..tasks.heatmap_job import run_heatmap_job

    request = request_of(args)
    result = run_heatmap_job(request)
    print(result.summary())
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
