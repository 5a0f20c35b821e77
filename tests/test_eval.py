"""Evaluation (issue 6): metrics, baselines, Ray Data batch scoring + resume, Table 1/3 CLIs, generate -> filter."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rayapp.eval import metrics as M

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ metrics
def test_accuracy_hand_computed_with_human_and_model_ties():
    # prompt 1: ranks [1, 2, 2, 3]; pairs of unequal rank: (0,1) (0,2) (0,3) (1,3) (2,3) = 5, (1,2) skipped
    # scores [0.9, 0.5, 0.1, 0.5]: (0,1) ok, (0,2) ok, (0,3) ok, (1,3) tie -> wrong, (2,3) 0.1 < 0.5 -> wrong
    r1 = ([1, 2, 2, 3], [0.9, 0.5, 0.1, 0.5])
    # prompt 2: ranks [2, 1]; scores [0.0, 1.0] -> 1/1
    r2 = ([2, 1], [0.0, 1.0])
    # prompt 3: all tied for the humans -> no pairs, skipped
    r3 = ([1, 1, 1], [0.3, 0.2, 0.1])
    one = M.prompt_accuracy(*r1)
    assert (one.correct, one.pairs, one.model_ties) == (3, 5, 1)
    res = M.preference_accuracy([r1, r2, r3])
    assert (res.correct, res.pairs, res.prompts, res.prompts_skipped, res.model_ties) == (4, 6, 2, 1, 1)
    assert res.micro == pytest.approx(4 / 6)
    assert res.per_prompt == pytest.approx((3 / 5 + 1) / 2)
    # a constant scorer is wrong on every pair (ties count wrong), never 50 %
    assert M.preference_accuracy([([1, 2, 3], [0.5, 0.5, 0.5])]).micro == 0.0
    with pytest.raises(ValueError, match="NaN"):
        M.preference_accuracy([([1, 2], [0.1, float("nan")])])


def test_accuracy_matches_reference_definition_on_fixture():
    """The reference's test.py loop (strict '<' for correct, ties wrong, equal ranks skipped), re-derived."""
    import random

    rng = random.Random(3)
    records = []
    for _ in range(30):
        n = rng.randint(2, 7)
        records.append(([rng.randint(1, 4) for _ in range(n)], [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n)]))
    total = true = 0
    for ranks, scores in records:
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                if ranks[i] > ranks[j]:
                    total += 1
                    true += scores[i] < scores[j]
                elif ranks[i] < ranks[j]:
                    total += 1
                    true += scores[i] > scores[j]
    assert M.preference_accuracy(records).micro == pytest.approx(true / total)


def test_recall_filter_hand_computed_ties_and_large_k():
    # 4 images, human best = 0, worst = 3. scores: best is 2nd, worst is lowest.
    rec = ([1, 2, 3, 4], [0.5, 0.9, 0.1, 0.0])
    res = M.recall_filter_at_k([rec], ks=(1, 2, 4, 8))
    assert res.recall == {1: 0.0, 2: 1.0, 4: 1.0, 8: 1.0}
    assert res.filter == {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0}
    assert res.trivial == {1: 0, 2: 0, 4: 1, 8: 1}
    # model ties at the boundary: best tied with 2 others at the top -> P(top1) = 1/3, P(top2) = 2/3
    tie = ([1, 2, 3, 3], [0.7, 0.7, 0.7, 0.1])
    res = M.recall_filter_at_k([tie], ks=(1, 2))
    assert res.recall[1] == pytest.approx(1 / 3) and res.recall[2] == pytest.approx(2 / 3)
    # human-worst is tied between images 2 and 3: mean of P(bottom1) = (0 + 1) / 2
    assert res.filter[1] == pytest.approx(0.5)
    # constant scorer = random baseline K/n exactly
    const = M.recall_filter_at_k([([1, 2, 3, 4, 5, 6, 7, 8], [0.0] * 8)], ks=(1, 2, 4))
    assert const.recall == {1: 0.125, 2: 0.25, 4: 0.5} and const.filter == {1: 0.125, 2: 0.25, 4: 0.5}
    # all-equal human ranks carry no best/worst
    assert M.recall_filter_at_k([([2, 2], [0.1, 0.2])]).prompts_skipped == 1


def test_table1_aggregation_and_spearman_with_ties():
    per_model = {
        "a": {"p1": [1.0, 3.0], "p2": [0.0]},  # per-prompt means 2.0, 0.0 -> 1.0 (not the image mean 4/3)
        "b": {"p1": [0.5], "p2": [0.5, 0.5]},  # 0.5
        "c": {"p1": [-1.0], "p2": []},  # p2 has no images -> mean over p1 only = -1.0
    }
    res = M.table1(per_model, human_ranking={"a": 1, "b": 2, "c": 3})
    assert res.scores == pytest.approx({"a": 1.0, "b": 0.5, "c": -1.0})
    assert res.ranking == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert res.prompts == {"a": 2, "b": 2, "c": 1}
    assert res.spearman == pytest.approx(1.0)
    reversed_ = M.table1(per_model, human_ranking={"a": 3, "b": 2, "c": 1})
    assert reversed_.spearman == pytest.approx(-1.0)
    # ties: average ranks; rho of [1, 2, 2] vs [1, 2, 3]
    assert M.average_ranks([3.0, 1.0, 1.0], descending=True) == [1.0, 2.5, 2.5]
    assert M.spearman_rho([1, 2, 2], [1, 2, 3]) == pytest.approx(0.8660254, abs=1e-6)


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    from rayapp.data.synth import write_synthetic_set

    out = tmp_path_factory.mktemp("eval_synth") / "set"
    write_synthetic_set(out, prompts=30, per_prompt=4, seed=1, val_fraction=0.2, test_fraction=0.2, progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_rm_dir(synth, tmp_path_factory) -> Path:
    import rayapp

    out = tmp_path_factory.mktemp("eval_rm")
    rayapp.create_model("tiny", tokenizer=synth / "tokenizer", seed=0).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def flat_parquet(synth, tmp_path_factory) -> Path:
    """One image per row (2 files), from the synthetic test + val splits, with a pass-through column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayapp.data.shards import iter_comparisons

    out = tmp_path_factory.mktemp("eval_flat")
    for split in ("test", "val"):
        rows = [{"id": f"{r['id']}#{k}", "prompt": r["prompt"], "image": img, "rank": r["ranking"][k]}
                for r in iter_comparisons(synth / split) for k, img in enumerate(r["images"])]
        pq.write_table(pa.Table.from_pylist(rows), out / f"{split}.parquet", row_group_size=7)
    return out


# -------------------------------------------------------------------------------------- baselines
def _images():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    return pil, rng.random((64, 64, 3)).astype("float32")


@pytest.mark.parametrize("name", ["CLIP", "BLIP", "Aesthetic"])
def test_baseline_tiny_through_loader(name, tmp_path):
    import io

    import rayapp
    from rayapp.model.images import ImageInputError

    pil, array = _images()
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    path = tmp_path / "x.png"
    pil.save(path)
    scorer = rayapp.load_score(name, config="tiny")
    assert not scorer.training
    scores = scorer.score("a red circle", [pil, str(path), buf.getvalue(), array])
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)
    assert scores[0] == pytest.approx(scores[1], abs=1e-6) == pytest.approx(scores[2], abs=1e-6)
    assert isinstance(scorer.score("a red circle", pil), float)
    assert scorer.score("a red circle", [pil]) == [pytest.approx(scores[0], abs=1e-6)]  # a list stays a list
    ranking, rewards = scorer.inference_rank("a red circle", [pil, array])
    assert sorted(ranking) == [1, 2] and ranking[rewards.index(max(rewards))] == 1
    # batched == one by one
    assert scorer.score("a red circle", [pil, array], batch_size=1) == pytest.approx(
        scorer.score("a red circle", [pil, array], batch_size=2), abs=1e-5)
    if name != "Aesthetic":  # the prompt matters except for the aesthetic predictor
        assert scorer.score("two blue squares", pil) != pytest.approx(scores[0], abs=1e-6)
    else:
        assert scorer.score("two blue squares", pil) == pytest.approx(scores[0], abs=1e-5)
    # save / reload round trip (safetensors), and a dtype option
    scorer.save_pretrained(tmp_path / "saved")
    again = rayapp.load_score(name, tmp_path / "saved")
    assert again.score("a red circle", pil) == pytest.approx(scores[0], abs=1e-6)
    half = rayapp.load_score(name, tmp_path / "saved", dtype="bfloat16")
    assert half.dtype == __import__("torch").bfloat16
    assert half.score("a red circle", pil) == pytest.approx(scores[0], abs=0.1)
    with pytest.raises(ImageInputError, match=r"image\[1\]"):
        scorer.score("a red circle", [pil, b"not an image"])


def test_baselines_real_loading_paths_offline(tmp_path):
    """The real-weight code paths, fed local files instead of downloads: BLIP from a model_large.pth-style
    checkpoint (BLIP_Pretrain key names + unused keys), Aesthetic from a CLIP dir + an MLP .pth, CLIP from a dir."""
    import torch

    from rayapp.eval.baselines import fetch_weights, load_score
    from rayapp.model.checkpoint import internal_to_official

    pil, _ = _images()
    # BLIP: write our tiny weights under the reference's names, with extra unused entries, then load them.
    tiny = load_score("BLIP", config="tiny", seed=5)
    state = {}
    for key, value in tiny.state_dict().items():
        if key.startswith(("vision.", "text.")):
            state[internal_to_official(key)[len("blip."):]] = value
        else:
            state[key] = value
    state["itm_head.weight"] = torch.zeros(2, 64)
    state["text_encoder_m.embeddings.word_embeddings.weight"] = torch.zeros(3, 3)
    torch.save({"model": state}, tmp_path / "model_large.pth")
    tiny.tokenizer.save_pretrained(tmp_path / "bert")
    blip = load_score("BLIP", weights=str(tmp_path / "model_large.pth"), tokenizer=tmp_path / "bert", blip_preset="tiny")
    assert blip.score("a red circle", pil) == pytest.approx(tiny.score("a red circle", pil), abs=1e-6)
    # Aesthetic: CLIPVisionModelWithProjection dir + the predictor's state dict (layers.{0,2,4,6,7})
    aes = load_score("Aesthetic", config="tiny", seed=2)
    aes.clip_vision.save_pretrained(tmp_path / "clipv")
    torch.save(aes.mlp.state_dict(), tmp_path / "aesthetic.pth")
    real_aes = load_score("Aesthetic", weights=str(tmp_path / "aesthetic.pth"), clip_model=str(tmp_path / "clipv"))
    assert real_aes.score("", pil) == pytest.approx(aes.score("", pil), abs=1e-6)
    # CLIP: a transformers CLIPModel dir + tokenizer, as from the hub
    clip = load_score("CLIP", config="tiny", seed=3)
    clip.model.save_pretrained(tmp_path / "clip")
    clip.tokenizer.save_pretrained(tmp_path / "clip")
    real = load_score("CLIP", clip_model=str(tmp_path / "clip"))
    assert real.score("a red circle", pil) == pytest.approx(clip.score("a red circle", pil), abs=1e-6)
    # downloads respect offline mode and never touch the network here
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        fetch_weights("https://example.invalid/none.pth", tmp_path / "cache")
