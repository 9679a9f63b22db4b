"""Patching on trained weights: the induction organism's card heads come out of exact patching first and AtP*
agrees with exact patching; the GQA recall organism per KV head; the real MiniLM on IOI pairs; the CLI on IOI."""

import pytest
import torch
from scipy.stats import spearmanr

import attnscope
from attnscope.circuits.gradient_patching import attribution_patching
from attnscope.circuits.patch_pairs import PatchPairs, induction_pairs, recall_pairs
from attnscope.circuits.patching import activation_patching
from attnscope.circuits.verified_patching import verified_top_k
from attnscope.probes.heads import HeadSet


def _zoo(name):
    from attnscope import zoo

    zoo.checkpoint_path(name)  # raises ModelNotFoundError if the shipped checkpoint is missing
    return attnscope.load(f"zoo:{name}"), zoo.load_card(name)


@pytest.fixture(scope="module")
def organism():
    from attnscope.tasks import build_suite

    model, card = _zoo("induction-2l")
    suite = build_suite("default", model, n_items=32)  # the card's data parameters, held-out seed
    return model, card, induction_pairs(suite, seed=0)


@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_induction_organism_exact_ranks_card_heads_first_and_atp_star_agrees(organism, direction):
    model, card, pairs = organism
    truth = set(HeadSet.parse(",".join(h for heads in card["ground_truth_heads"].values() for h in heads)))
    exact = activation_patching(model, pairs, "logit", direction=direction).df
    ranked = exact.assign(size=exact["effect"].abs()).sort_values("size", ascending=False)
    assert {(int(r.layer), int(r.head)) for r in ranked.head(len(truth)).itertuples()} == truth
    star = attribution_patching(model, pairs, "logit", method="atp*", direction=direction).df
    merged = exact.merge(star, on=["layer", "head"], suffixes=("_exact", "_star"))
    rho = spearmanr(merged["effect"].abs(), merged["value_star"].abs()).statistic
    assert rho >= 0.9, (rho, merged[["layer", "head", "effect", "value_star"]])
    top10 = set(map(tuple, merged.sort_values("value_star", ascending=False).head(10)[["layer", "head"]].values))
    large = set(map(tuple, merged[merged["effect"].abs() > 0.1 * merged["effect"].abs().max()][["layer", "head"]]
                    .values))
    assert large <= top10
    # switched-off heads (outputs 0) have exactly zero effect and zero estimate
    off = merged[[(int(l), int(h)) not in truth for l, h in zip(merged["layer"], merged["head"])]]
    assert (off["effect"] == 0).all() and (off["value_star"] == 0).all()


def test_induction_organism_verified_top_k(organism):
    model, _, pairs = organism
    table = verified_top_k(model, pairs, "logit", k=2, n_random=4, seed=1)
    df = table.df
    top = df[(df["role"] == "top") & (df["method"] == "exact")]
    assert {(int(r.layer), int(r.head)) for r in top.itertuples()} == {(0, 3), (1, 2)}
    assert table.provenance["false_negative_rate_upper"] == pytest.approx(1 - 0.05 ** (1 / 4))  # 0 of 4 over


def test_recall_organism_gqa_patching_per_kv_head_finds_the_retrieval_head():
    from attnscope.tasks import build_suite

    model, card = _zoo("recall-llama")
    suite = build_suite("default", model, n_items=16)
    pairs = recall_pairs(suite)
    per_head = activation_patching(model, pairs, "logit_diff").df
    best = per_head.loc[per_head["effect"].abs().idxmax()]
    assert f"L{int(best['layer'])}H{int(best['head'])}" in card["ground_truth_heads"]["retrieval"]
    per_kv = activation_patching(model, pairs, "logit_diff", granularity="kv_head").df
    kv = per_kv.loc[per_kv["effect"].abs().idxmax()]
    assert (int(kv["layer"]), int(kv["head"])) == (int(best["layer"]), int(best["head"]) // 2)  # 4 q / 2 KV heads
    atp = attribution_patching(model, pairs, "logit_diff", method="atp", granularity="kv_head").df
    assert atp.loc[atp["value"].abs().idxmax(), ["layer", "head"]].tolist() == [kv["layer"], kv["head"]]


def test_minilm_ioi_pairs_exact_and_atp_agree(minilm):
    from attnscope.circuits.task_metrics import mean_pool
    from attnscope.datasets import ioi

    pairs = PatchPairs.from_suite(ioi(4, seed=0, tokenizer=minilm.tokenizer), minilm.tokenizer)
    batch = pairs.batches(8)[0]
    with torch.no_grad():
        pooled = {side: mean_pool(minilm.module(input_ids=batch.ids(side), attention_mask=batch.attention_mask),
                                  batch.attention_mask).mean(0) for side in ("clean", "corrupt")}
    direction = pooled["clean"] - pooled["corrupt"]

    def along(output, b):  # the sentence embedding along the clean-minus-corrupted direction
        return mean_pool(output, b.attention_mask) @ direction

    exact = activation_patching(minilm, pairs, along).df
    atp = attribution_patching(minilm, pairs, along, method="atp").df
    assert len(exact) == 72 and spearmanr(exact["effect"], atp["value"]).statistic > 0.9


def test_cli_patch_ioi_with_a_real_tokenizer(tmp_path, minilm, capsys):
    import transformers

    from attnscope.cli import main
    from attnscope.results import ResultTable

    torch.manual_seed(0)  # a tiny GPT-2 with MiniLM's WordPiece vocabulary, saved with its tokenizer
    cfg = transformers.GPT2Config(vocab_size=minilm.tokenizer.vocab_size, n_positions=64, n_embd=16, n_layer=2,
                                  n_head=4, bos_token_id=None, eos_token_id=None)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "m")
    minilm.tokenizer.save_pretrained(tmp_path / "m")
    out = tmp_path / "ioi.parquet"
    assert main(["patch", "--model", str(tmp_path / "m"), "--suite", "ioi", "--n-items", "6", "--method", "atp*",
                 "--verify-top", "2", "--random-controls", "2", "--direction", "denoise", "--out", str(out),
                 "--no-progress"]) == 0
    df = ResultTable.load(out).df
    assert set(df["method"]) == {"atp*", "exact", "clopper_pearson_controls"}
    assert not df[df["method"] == "exact"]["is_estimate"].any() and df[df["method"] != "exact"]["is_estimate"].all()
    assert "not verified" in capsys.readouterr().out
