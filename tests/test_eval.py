"""Evaluation (issue 6): metrics, baselines, Ray Data batch scoring + resume, Table 1/3 CLIs, generate -> filter."""
from __future__ import annotations

import json
import math
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
        records.append(([rng.randint(1, 4) for _ in range(n)],
                        [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n)]))
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
        if split == "val":  # one undecodable image: NaN + score_error, the job goes on
            rows.insert(3, {"id": "junk", "prompt": "a red circle", "image": b"junk", "rank": 1})
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
    scorer = rayapp.load_score(name, "cpu", config="tiny")  # the reference's positional (name, device)
    assert not scorer.training and scorer.device.type == "cpu"
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


def test_baseline_registry_one_module_per_scorer(tmp_path):
    """Every baseline registration names a module with the three constructors; names, spec parsing and saved
    dirs agree."""
    import importlib

    import rayapp
    from rayapp import scorers
    from rayapp.eval.scorers import parse_spec

    baselines = {name: scorers.registration(name).module for name in scorers.available_scores()
                 if scorers.registration(name).module is not None}
    assert list(baselines) == ["CLIP", "BLIP", "Aesthetic", "PickScore", "HPSv2", "HPSv2.1"]
    for name, module_name in baselines.items():
        module = importlib.import_module(module_name)
        assert all(callable(getattr(module, f, None)) for f in ("build_tiny", "load_saved", "load_real"))
        assert scorers.canonical_name(name.upper()) == name
        assert parse_spec(f"{name.lower()}:tiny").scorer == name
    with pytest.raises(ValueError, match="available scores"):
        rayapp.load_score("PickScore-v9")
    with pytest.raises(ValueError, match="unknown scorer"):
        parse_spec("PickScore-v9")
    rayapp.load_score("CLIP", config="tiny").save_pretrained(tmp_path / "clip")
    assert parse_spec(str(tmp_path / "clip")).scorer == scorers.saved_scorer(tmp_path / "clip") == "CLIP"
    with pytest.raises(ValueError, match="holds a 'CLIP' scorer, not 'BLIP'"):
        rayapp.load_score("BLIP", tmp_path / "clip")
    with pytest.raises(FileNotFoundError, match="scorer.json"):
        rayapp.load_score("BLIP", tmp_path)


def test_baselines_real_loading_paths_offline(tmp_path):
    """The real-weight code paths, fed local files instead of downloads: BLIP from a model_large.pth-style
    checkpoint (BLIP_Pretrain key names + unused keys), Aesthetic from a CLIP dir + an MLP .pth, CLIP from a dir."""
    import torch

    from rayapp.eval.baselines import load_score
    from rayapp.eval.baselines.download import fetch_weights
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
    blip = load_score("BLIP", weights=str(tmp_path / "model_large.pth"), tokenizer=tmp_path / "bert",
                      blip_preset="tiny")
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


# ------------------------------------------------------------------------------------ batch scoring
def test_batch_scoring_equals_library_row_by_row(ray_cluster, flat_parquet, tiny_rm_dir, tmp_path):
    import pyarrow.parquet as pq

    from rayapp.eval.batch_scoring import ScoreJobConfig, read_scored, run_score_job
    from rayapp.eval.scorers import load_scorer

    out = tmp_path / "scores"
    config = ScoreJobConfig(input=str(flat_parquet), output=str(out), scorers=[str(tiny_rm_dir), "CLIP:tiny"],
                            batch_size=5, rows_per_block=16, concurrency=1, num_cpus=0.5, progress=False)
    result = run_score_job(config)
    inputs = pq.read_table(flat_parquet)
    assert result.rows_written == inputs.num_rows == result.images_scored and result.errors == 1
    assert result.rows_per_s > 0 and "images/s" in result.summary()
    table = read_scored(out)
    keys = table["_row_key"].to_pylist()
    assert len(keys) == len(set(keys)) == inputs.num_rows
    by_id = {row["id"]: row for row in table.to_pylist()}
    assert set(by_id) == set(inputs["id"].to_pylist())
    junk = by_id.pop("junk")
    assert math.isnan(junk["score_ImageReward"]) and math.isnan(junk["score_CLIP"])
    assert "cannot decode" in junk["score_error"]
    for spec, column in ((str(tiny_rm_dir), "score_ImageReward"), ("CLIP:tiny", "score_CLIP")):
        scorer = load_scorer(spec, device="cpu")
        ids = sorted(by_id)
        expected = scorer.score_pairs([by_id[i]["prompt"] for i in ids], [by_id[i]["image"] for i in ids])
        for row_id, value in zip(ids, expected):
            assert by_id[row_id][column] == pytest.approx(value, abs=1e-5), (spec, row_id)
    assert all(row["image"] and row["rank"] >= 1 and row["score_error"] is None for row in by_id.values())


def test_score_job_resume_after_crash_writes_each_row_once(ray_cluster, synth, tiny_rm_dir, tmp_path, capsys):
    """A real crash of the job's driver process (a hard exit once 2 parts exist) then `--resume` via the job
    script. The crash comes from tests/faults.py, loaded into the job's process before the job runs."""
    from rayapp.data.shards import count_rows, iter_comparisons
    from rayapp.eval.batch_scoring import read_scored

    out = tmp_path / "scores"
    data = synth / "train"
    job_script = str(REPO / "jobs" / "score_dataset.py")
    cmd = [sys.executable, job_script, "--input", str(data), "--output", str(out),
           "--scorer", str(tiny_rm_dir), "--rows-per-block", "2", "--num-cpus", "0.5", "--no-progress",
           "--drop-images"]
    crash_then_run = (f"import runpy, sys; from faults import exit_once_files_exist; "
                      f"exit_once_files_exist({str(out)!r}, 'part-*.parquet', 2, code=17); "
                      f"sys.argv = {cmd[1:]!r}; runpy.run_path({job_script!r}, run_name='__main__')")
    env = {**ray_cluster.env, "PYTHONPATH": str(REPO / "tests")}
    crashed = subprocess.run([sys.executable, "-c", crash_then_run], env=env, check=False, capture_output=True,
                             text=True, timeout=240)
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    partial = read_scored(out)["_row_key"].to_pylist()
    total = count_rows(data)
    assert 0 < len(partial) < total
    # resume through the job's entry point (what jobs/score_dataset.py runs), in this process (connected already)
    from rayapp.eval.score_dataset import main as score_dataset_main

    assert score_dataset_main(cmd[2:] + ["--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(partial)} rows already done" in printed and "images/s" in printed
    table = read_scored(out)
    keys = table["_row_key"].to_pylist()
    assert len(keys) == len(set(keys)) == total  # no row twice, none missing
    assert set(partial) <= set(keys)
    # comparison rows: one score per image, in image order, equal to the library's
    import rayapp

    model = rayapp.load(tiny_rm_dir)
    scored = {r["id"]: r["score_ImageReward"] for r in table.to_pylist()}
    assert "images" not in table.column_names
    for record in iter_comparisons(data):
        assert scored[record["id"]] == pytest.approx(model.score(record["prompt"], record["images"]), abs=1e-5)
    # a rerun without --resume refuses to mix runs
    assert score_dataset_main(cmd[2:]) == 2 and "--resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- Table 3 / Table 1
def test_table3_cli_end_to_end_on_synthetic_set(synth, tiny_rm_dir, tmp_path, capsys):
    from rayapp.cli import main
    from rayapp.data.shards import iter_comparisons
    from rayapp.eval.scorers import load_scorer

    out, plot = tmp_path / "t3.json", tmp_path / "t3.png"
    rc = main(["eval", "table3", "--data", str(synth / "test"), "--scorer", str(tiny_rm_dir),
               "--scorer", "CLIP:tiny", "--out", str(out), "--plot", str(plot), "--quiet", "--batch-size", "3"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "| ImageReward |" in printed and "| CLIP |" in printed and "R@4 %" in printed and "F@1 %" in printed
    assert "65.14" in printed and "54.82" in printed  # the published numbers, printed for reference
    report = json.loads(out.read_text())
    records = list(iter_comparisons(synth / "test"))
    assert report["prompts"] == len(records)
    model = load_scorer(str(tiny_rm_dir))
    expected = [(r["ranking"], model.score(r["prompt"], r["images"])) for r in records]
    acc = M.preference_accuracy(expected)
    rf = M.recall_filter_at_k(expected)
    got = report["results"]["ImageReward"]
    assert got["accuracy"]["pairs"] == acc.pairs > 0
    assert got["accuracy"]["micro"] == pytest.approx(acc.micro)
    assert got["accuracy"]["per_prompt"] == pytest.approx(acc.per_prompt)
    assert got["recall_filter"]["recall"]["2"] == pytest.approx(rf.recall[2])
    assert got["published"]["accuracy"] == 65.14
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table1_cli_end_to_end(synth, tiny_rm_dir, tmp_path, capsys):
    from PIL import Image

    from rayapp.cli import main
    from rayapp.data.shards import iter_comparisons
    from rayapp.eval.scorers import load_scorer

    records = list(iter_comparisons(synth / "test"))
    root = tmp_path / "generations"
    picks = {"best": lambda r: [i for i, x in enumerate(r["ranking"]) if x == min(r["ranking"])],
             "worst": lambda r: [i for i, x in enumerate(r["ranking"]) if x == max(r["ranking"])],
             "all": lambda r: list(range(len(r["images"])))}
    for name, pick in picks.items():
        (root / name).mkdir(parents=True)
        for r in records[:-1]:  # the last prompt has no generations: it must simply be left out
            for k, i in enumerate(pick(r)):
                (root / name / f"{r['id']}_{k}.png").write_bytes(r["images"][i])
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"id": r["id"], "prompt": r["prompt"]} for r in records]))
    out, plot = tmp_path / "t1.json", tmp_path / "t1.png"
    rc = main(["eval", "table1", "--prompts", str(prompts), "--generations-root", str(root),
               "--scorer", str(tiny_rm_dir), "--human-ranking", "best,all,worst", "--out", str(out),
               "--plot", str(plot), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0 and "| best |" in printed and "Spearman rho (ImageReward vs human ranking, 3 models)" in printed
    res = json.loads(out.read_text())["results"]["ImageReward"]
    model = load_scorer(str(tiny_rm_dir))
    for name, pick in picks.items():
        means = [sum(s) / len(s) for s in (model.score(r["prompt"], [Image.open(root / name / f"{r['id']}_{k}.png")
                                                               for k in range(len(pick(r)))]) for r in records[:-1])]
        assert res["scores"][name] == pytest.approx(sum(means) / len(means), abs=1e-5)
        assert res["prompts"][name] == len(records) - 1
    order = sorted(res["scores"], key=lambda m: -res["scores"][m])
    assert [res["ranking"][m] for m in order] == [1.0, 2.0, 3.0]
    expected_rho = M.spearman_rho([res["scores"][m] for m in ("best", "all", "worst")], [-1, -2, -3])
    assert res["spearman"] == pytest.approx(expected_rho)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ generate
def test_generate_filter_writes_pngs_with_score_chunk(tiny_rm_dir, tmp_path, capsys):
    from PIL import Image

    from rayapp.cli import main
    from rayapp.diffusion.tiny import build_tiny_sd_pipeline
    from rayapp.eval.generate import read_score

    sd = build_tiny_sd_pipeline(tmp_path / "sd")
    base = ["generate", "--pipeline", str(sd), "--scorer", str(tiny_rm_dir), "--prompt", "a red circle",
            "-n", "3", "--steps", "2", "--seed", "7", "--quiet"]
    assert main(base + ["--keep-all", "--out", str(tmp_path / "all")]) == 0
    files = sorted((tmp_path / "all").glob("000-*.png"))
    assert len(files) == 3
    scores = [read_score(f) for f in files]
    assert scores == sorted(scores, reverse=True)  # file order = rank order
    for f in files:
        text = Image.open(f).text
        assert text["parameters"].startswith("a red circle\nSteps: 2, Sampler: DDIMScheduler, CFG scale: 7.5, Seed: ")
        assert f"ImageReward Score: {float(text['ImageReward Score']):.4f}" in text["parameters"]
    # the stored score is the library's score of the saved image (PNG is lossless)
    import rayapp

    model = rayapp.load(tiny_rm_dir)
    assert model.score("a red circle", [str(f) for f in files]) == pytest.approx(scores, abs=6e-5)
    assert (tmp_path / "all" / "contact_sheet.png").is_file()
    # filtering: a threshold between the 2nd and 3rd score keeps exactly 2, same seeds -> same images
    threshold = (scores[1] + scores[2]) / 2
    assert main(base + ["--min-score", str(threshold), "--out", str(tmp_path / "some")]) == 0
    kept = sorted((tmp_path / "some").glob("000-*.png"))
    assert [read_score(f) for f in kept] == scores[:2]
    manifest = json.loads((tmp_path / "some" / "generate.json").read_text())
    assert len(manifest["kept"]) == 2 and len(manifest["dropped"]) == 1
    # nothing survives: say so, exit 0, write no image
    capsys.readouterr()
    assert main(base + ["--min-score", "1000", "--out", str(tmp_path / "none")]) == 0
    assert "no image reached --min-score 1000" in capsys.readouterr().out
    assert not list((tmp_path / "none").glob("*.png"))


def test_cli_modules_import_light():
    code = ("import sys, rayapp.eval.cli, rayapp.eval.generate; "
            "heavy = [m for m in ('torch', 'ray', 'diffusers', 'transformers', 'matplotlib') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_folder_input_planning_and_actor_in_process(synth, tiny_rm_dir, tmp_path):
    """Folder + CSV prompts file: keys per line, resume skipping, and the actor's scores (called directly)."""
    import csv

    from rayapp.data.shards import iter_comparisons
    from rayapp.eval.batch_scoring import (
        ScoreActor,
        ScoreJobConfig,
        detect_format,
        plan_units,
    )
    from rayapp.eval.scorers import load_scorer

    record = next(iter(iter_comparisons(synth / "test")))
    folder = tmp_path / "shots"
    (folder / "sub").mkdir(parents=True)
    with open(folder / "prompts.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "path", "note"])
        writer.writeheader()
        for k, image in enumerate(record["images"]):
            (folder / "sub" / f"{k}.png").write_bytes(image)
            writer.writerow({"prompt": record["prompt"], "path": f"sub/{k}.png", "note": f"n{k}"})
        writer.writerow({"prompt": record["prompt"], "path": "sub/missing.png", "note": "gone"})
    config = ScoreJobConfig(input=str(folder), output=str(tmp_path / "out"), rows_per_block=3)
    assert detect_format(config) == "folder"
    units, todo, skipped = plan_units(config, "folder", done={"prompts.csv:1"})
    assert (todo, skipped, len(units)) == (len(record["images"]), 1, math.ceil(len(record["images"]) / 3))
    actor = ScoreActor([str(tiny_rm_dir)], "folder", "image", "prompt", str(folder), 2, "cpu", None, None)
    table = __import__("pyarrow").concat_tables([actor({k: [v] for k, v in unit.items()}) for unit in units])
    rows = {r["_row_key"]: r for r in table.to_pylist()}
    assert sorted(rows) == [f"prompts.csv:{n}" for n in range(2, len(record["images"]) + 2)]
    model = load_scorer(str(tiny_rm_dir))
    for n in range(2, len(record["images"]) + 1):
        row = rows[f"prompts.csv:{n}"]
        assert row["note"] == f"n{n - 1}" and row["score_error"] is None
        expected = model.score(record["prompt"], record["images"][n - 1])
        assert row["score_ImageReward"] == pytest.approx(expected, abs=1e-5)
    gone = rows[f"prompts.csv:{len(record['images']) + 1}"]
    assert math.isnan(gone["score_ImageReward"]) and "no such file" in gone["score_error"]
