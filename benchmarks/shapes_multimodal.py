"""Ground-truth checks of the multimodal analyses on the shapes organisms (issue #8), printed as tables:

1. DAAM (teacher-forced held-out two-object scenes, steps = noise levels): IoU of each object's word map with its
   own mask vs the other object's mask vs a constant map (the mask area), per cross-attention layer and step, and
   the best aggregation.
2. HRV ordered weakening on ``shapes-diffusion``: HRV over captions, then per concept the classifier score of the
   concept in generated images as the k most (MoRHF) / least (LeRHF) relevant heads are weakened (factor -2).
3. ``shapes-vlm``: visual heads' attention on the queried object vs the rest of the image; FasterVLM keep-ratio
   curve ([CLS]-ranked vs random patches), answer accuracy.

Usage: ``python benchmarks/shapes_multimodal.py [--prompts 12] [--scenes 24] [--out results/bench_shapes.json]``.
``--quick`` (CI smoke run): 2 scenes; HRV over 2 captions with 2 denoising steps, weakening of 2 concepts (a colour
and a shape) on 1 prompt at k = 0, 2, 4; 4 VLM questions; one torch thread.
"""

import argparse
import json
import time
from pathlib import Path

CONCEPTS = ("red", "green", "blue", "yellow", "circle", "square", "triangle")
KS = (0, 2, 4, 6, 8, 12, 16)


def daam_section(pipe, n_scenes: int) -> dict:
    from attnscope.circuits.daam_segmentation import best_aggregation, daam_iou
    from attnscope.zoo.shapes_checks import teacher_forced_daam, two_object_scenes

    result, masks = teacher_forced_daam(pipe, two_object_scenes(n_scenes, seed=2024))
    own, other = daam_iou(result, masks), daam_iou(result, masks.flip(1))
    means = own.df.groupby(["site", "step"])["value"].mean().unstack()
    full = lambda t: float(t.df[(t.df["site"] == "all") & (t.df["step"] == -1)]["value"].mean())  # noqa: E731
    print(f"\n[DAAM IoU] {n_scenes} two-object scenes, steps = noise levels (100, 300, 500, 700, 900); "
          f"full DAAM: own mask {full(own):.3f}, other object's mask {full(other):.3f}, constant map "
          f"{float(masks.float().mean()):.3f}")
    print(means.round(3).to_string())
    best = best_aggregation(own)
    print(f"best aggregation: {best}")
    return {"own": full(own), "other": full(other), "area": float(masks.float().mean()), "best": best,
            "per_site_step": {f"{s}|{t}": float(v) for (s, t), v in means.stack().items()}}


def hrv_section(pipe, n_prompts: int, n_captions: int = 24, steps: int = 10, concepts=CONCEPTS, ks=KS) -> dict:
    from attnscope.circuits.hrv import head_relevance
    from attnscope.circuits.hrv_weakening import ordered_weakening
    from attnscope.datasets.shapes import shapes_scenes
    from attnscope.zoo.shapes_checks import concept_scorer

    captions = [s.caption for s in shapes_scenes(n_captions, seed=3)]
    hrv = head_relevance(pipe, captions, {c: [c] for c in CONCEPTS}, num_inference_steps=steps, guidance_scale=3.0)
    print(f"\n[HRV ordered weakening] HRV over {len(captions)} captions; {n_prompts} prompts per concept, "
          f"k of {len(hrv.heads)} heads weakened (x -2.0), classifier score of the concept")
    out = {}
    for word in concepts:
        prompts = [s.caption for s in shapes_scenes(120, seed=11) if word in s.caption.split()][:n_prompts]
        table = ordered_weakening(pipe, prompts, hrv, word, word, concept_scorer(word), ks=ks, seed=5,
                                  num_inference_steps=steps, guidance_scale=3.0).df
        curve = table.pivot_table(index="k", columns="order", values="value")
        mid = curve.loc[[k for k in ks if 0 < k < max(ks)]].mean()
        out[word] = {"MoRHF": curve["MoRHF"].tolist(), "LeRHF": curve["LeRHF"].tolist(),
                     "mean_MoRHF": float(mid["MoRHF"]), "mean_LeRHF": float(mid["LeRHF"])}
        print(f"{word:>9s} MoRHF {[round(v, 2) for v in curve['MoRHF']]}  LeRHF "
              f"{[round(v, 2) for v in curve['LeRHF']]}  mean over 0<k<{max(ks)}: {mid['MoRHF']:.3f} vs "
              f"{mid['LeRHF']:.3f}")
    return out


def vlm_section(n_items: int) -> dict:
    import attnscope
    from attnscope.circuits.visual_head_scores import visual_heads
    from attnscope.circuits.cls_token_pruning import visual_token_pruning
    from attnscope.datasets.shapes_vlm_suite import shapes_vlm_examples

    vlm = attnscope.load("zoo:shapes-vlm")
    examples = shapes_vlm_examples(vlm, n_items, seed=5)
    heads = visual_heads(vlm, examples, queries="last").df
    ratio = heads[heads["metric"] == "target_ratio"].sort_values("value", ascending=False)
    print(f"\n[VLM visual heads] {n_items} questions; attention per patch on the queried object / elsewhere "
          "(last token):")
    print(ratio[["layer", "head", "value"]].round(3).to_string(index=False))
    curve = visual_token_pruning(vlm, examples, ratios=(1.0, 0.5, 0.25, 0.125)).df
    acc = curve[curve["metric"] == "answer_accuracy"].pivot_table(index="ratio", columns="selection", values="value")
    print("[FasterVLM] answer accuracy vs kept fraction of the 16 image tokens:")
    print(acc.round(3).to_string())
    return {"target_ratio": {f"L{int(r.layer)}H{int(r.head)}": float(r.value) for r in ratio.itertuples()},
            "keep_ratio_accuracy": {str(k): v for k, v in acc.to_dict(orient="index").items()}}


def main() -> None:
    import torch

    import attnscope

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--vlm-items", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/bench_shapes_multimodal.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few scenes, prompts and steps")
    args = parser.parse_args()
    hrv_options = {}
    if args.quick:
        args.prompts, args.scenes, args.vlm_items, args.threads = 1, 2, 4, 1  # 1 thread: steady on busy cores
        hrv_options = dict(n_captions=2, steps=2, concepts=("red", "circle"), ks=(0, 2, 4))
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = attnscope.load("zoo:shapes-diffusion")
    report = {"daam": daam_section(pipe, args.scenes), "hrv": hrv_section(pipe, args.prompts, **hrv_options),
              "vlm": vlm_section(args.vlm_items), "seconds": time.perf_counter() - start}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{report['seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
