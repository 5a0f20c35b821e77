"""Comparison data: pair expansion, synthetic set, JSON -> Parquet conversion, and the Ray Data pipeline."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayapp.data import synth
from rayapp.data.formats import BadRecordsError, convert
from rayapp.data.pairs import expand_pairs, iter_pairs, pair_indices, pair_stats
from rayapp.data.shards import iter_comparisons

SYNTH_SIZE = 64
PIPE_SIZE = 48  # != the stored 64 px, so the pipeline's resize + crop path is exercised
MAX_LEN = 16


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "set"
    synth.write_synthetic_set(out, prompts=20, per_prompt=4, seed=11, image_size=SYNTH_SIZE,
                              val_fraction=0.2, test_fraction=0.2, rows_per_shard=6, progress=False)
    return out


def _write_png(path: Path, colour, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture()
def json_db(tmp_path) -> tuple[Path, Path]:
    """An ImageRewardDB-style JSON with two good records (with ties) and four bad ones."""
    root = tmp_path / "images"
    for i in range(4):
        _write_png(root / "p" / f"{i}.png", (60 * i, 20, 200 - 40 * i))
    (root / "p" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    records = [
        {"id": "good-1", "prompt": "a red cat", "generations": ["p/0.png", "p/1.png", "p/2.png", "p/3.png"],
         "ranking": [2, 1, 2, 3]},
        {"id": "missing-file", "prompt": "a dog", "generations": ["p/0.png", "p/nope.png"], "ranking": [1, 2]},
        {"id": "bad-length", "prompt": "a dog", "generations": ["p/0.png", "p/1.png"], "ranking": [1, 2, 3]},
        {"id": "corrupt-image", "prompt": "a dog", "generations": ["p/corrupt.png", "p/1.png"], "ranking": [1, 2]},
        {"id": "empty-prompt", "prompt": "  ", "generations": ["p/0.png", "p/1.png"], "ranking": [1, 2]},
        {"id": "good-2", "prompt": "two blue circles", "generations": ["p/3.png", "p/2.png", "p/1.png"],
         "ranking": [1, 1, 2]},
    ]
    path = tmp_path / "db.json"
    path.write_text(json.dumps(records))
    return path, root


BAD_IDS = {"missing-file", "bad-length", "corrupt-image", "empty-prompt"}


# ---------------------------------------------------------------- pairs

def test_expand_pairs_with_ties_hand_computed():
    # ranks 2,1,2,3: image 1 beats 0, 2, 3; 0 and 2 tie (no pair); 0 and 2 beat 3 -> 5 pairs
    assert pair_indices([2, 1, 2, 3]) == [(1, 0), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert pair_indices([1, 1, 1]) == []
    assert pair_indices([3, 1]) == [(1, 0)]
    record = {"id": "r", "prompt": "p", "ranking": [1, 2, 2, 4], "faithfulness": [2, 2, 1, 1], "quality": [2, 1, 2, 0]}
    kinds = {(p["better"], p["worse"]): p["pair_kind"] for p in expand_pairs(record)}
    # (0,1): same f, q 2>1 -> quality; (0,2): same q, f differs -> caption; (0,3): both differ;
    # (1,2): tie, no pair; (1,3): f differs, q differs -> both; (2,3): same f -> quality
    assert kinds == {(0, 1): "quality", (0, 2): "caption", (0, 3): "both", (1, 3): "both", (2, 3): "quality"}
    plain = {"id": "h", "prompt": "p", "ranking": [1, 2]}
    assert [p["pair_kind"] for p in expand_pairs(plain)] == ["human"]


# ---------------------------------------------------------------- synthetic set

def _colour_area(img: Image.Image, colour) -> int:
    arr = np.asarray(img.convert("RGB"), dtype=np.int16)
    return int((np.abs(arr - np.array(colour)).max(axis=-1) <= 30).sum())


def test_synth_is_deterministic_and_follows_the_rule(synth_dir, tmp_path):
    again = tmp_path / "again"
    synth.write_synthetic_set(again, prompts=20, per_prompt=4, seed=11, image_size=SYNTH_SIZE,
                              val_fraction=0.2, test_fraction=0.2, rows_per_shard=6, progress=False)
    for split in ("train", "val", "test"):
        assert list(iter_comparisons(synth_dir / split)) == list(iter_comparisons(again / split)), split
    assert synth.make_record(3, seed=11) != synth.make_record(3, seed=12)

    records = [r for split in ("train", "val", "test") for r in iter_comparisons(synth_dir / split)]
    assert len(records) == 20 and len({r["id"] for r in records}) == 20
    kinds = set()
    for record in records:
        f, q, ranking = record["faithfulness"], record["quality"], record["ranking"]
        assert ranking == synth.rank_by_rule(f, q)
        best = [i for i, r in enumerate(ranking) if r == 1]
        assert best and all(f[i] == 2 and q[i] == 2 for i in best), record["id"]
        kinds.update(p["pair_kind"] for p in expand_pairs(record))
        # the faithful clean image draws exactly what the caption says: colour and count x size area
        words = record["prompt"].split()
        count = {v: k for k, v in synth.COUNT_WORDS.items()}[words[0]]
        img = Image.open(io.BytesIO(record["images"][best[0]]))
        assert img.size == (SYNTH_SIZE, SYNTH_SIZE)
        expected = count * np.pi * synth.RADIUS_64[words[1]] ** 2
        assert 0.7 * expected < _colour_area(img, synth.COLOURS[words[2]]) < 1.3 * expected, record["prompt"]
        for i, image in enumerate(record["images"]):
            colours = len(Image.open(io.BytesIO(image)).convert("RGB").getcolors(1 << 16))
            # clean = background + one object colour; blur / noise make many
            assert (colours <= 2) == (q[i] == 2), (record["id"], i, q[i], colours)
    assert kinds == {"caption", "quality", "both"}


def test_synth_split_sizes_and_tokenizer_cover_captions(synth_dir):
    from rayapp.model.tokenizer import load_tokenizer

    stats = {s: pair_stats(synth_dir / s) for s in ("train", "val", "test")}
    assert {s: v["prompts"] for s, v in stats.items()} == {"train": 12, "val": 4, "test": 4}
    manifest = json.loads((synth_dir / "synth.json").read_text())
    assert manifest["pairs"] == {s: v["pairs"] for s, v in stats.items()}
    tokenizer = load_tokenizer(synth_dir / "tokenizer")
    for record in iter_comparisons(synth_dir / "train"):
        tokens = tokenizer.tokenize(record["prompt"])
        assert tokenizer.unk_token not in tokens and len(tokens) == len(record["prompt"].split())


def test_cli_synth_writes_the_layout(tmp_path, capsys):
    from rayapp.cli import main

    out = tmp_path / "s"
    assert main(["data", "synth", "--prompts", "10", "--per-prompt", "3", "--out", str(out), "--seed", "4",
                 "--image-size", "32", "--attributes", "colour"]) == 0
    assert "train: 8 prompts" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["synth.json", "test", "tokenizer", "train", "val"]
    record = next(iter_comparisons(out / "val"))
    assert Image.open(io.BytesIO(record["images"][0])).size == (32, 32)
    assert main(["data", "synth", "--prompts", "10", "--out", str(out)]) == 2  # refuses to overwrite
    assert "not empty" in capsys.readouterr().err


# ---------------------------------------------------------------- JSON -> Parquet

def test_convert_fails_naming_every_bad_record(json_db, tmp_path):
    path, root = json_db
    out = tmp_path / "out"
    with pytest.raises(BadRecordsError) as info:
        convert(path, root, out, progress=False)
    assert {rid for rid, _ in info.value.bad} == BAD_IDS
    for rid in BAD_IDS:
        assert rid in str(info.value)
    reasons = dict(info.value.bad)
    assert "nope.png" in reasons["missing-file"] and "3 entries" in reasons["bad-length"]
    assert "decode" in reasons["corrupt-image"] and "prompt" in reasons["empty-prompt"]
    assert not out.exists() and list(tmp_path.glob(".out.partial-*")) == []  # nothing half-written


def test_convert_skip_bad_reports_and_keeps_the_same_pairs(json_db, tmp_path):
    path, root = json_db
    out = tmp_path / "out"
    report = convert(path, root, out, skip_bad=True, rows_per_shard=1, progress=False)
    assert {rid for rid, _ in report.bad} == BAD_IDS and report.rows == 2 and len(report.shards) == 2
    good = [r for r in json.loads(path.read_text()) if r["id"] not in BAD_IDS]
    expected = {(p["id"], p["better"], p["worse"]) for r in good for p in expand_pairs(r)}
    got = list(iter_pairs(out))
    assert {(p["id"], p["better"], p["worse"]) for p in got} == expected and len(got) == len(expected) == 7
    by_id = {r["id"]: r for r in good}
    for pair in got:  # images travel inline, byte for byte
        gens = by_id[pair["id"]]["generations"]
        assert pair["image_better"] == (root / gens[pair["better"]]).read_bytes()
        assert pair["image_worse"] == (root / gens[pair["worse"]]).read_bytes()


def test_cli_convert_exit_codes_and_messages(json_db, tmp_path, capsys):
    from rayapp.cli import main

    path, root = json_db
    args = ["data", "convert", str(path), "--image-root", str(root), "--out", str(tmp_path / "o")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert all(rid in err for rid in BAD_IDS) and "--skip-bad" in err
    assert main(args + ["--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "wrote 2 prompts" in captured.out and "skipped 4 bad records" in captured.out
    assert all(f"skipped {rid}:" in captured.err for rid in BAD_IDS)
    assert main(["data", "stats", str(tmp_path / "o")]) == 0
    assert "2 prompts, 7 images, 7 unequal-rank pairs (human 7)" in capsys.readouterr().out


def test_data_modules_do_not_import_ray():
    code = ("import sys, rayapp.data.cli, rayapp.data.synth, rayapp.data.formats, rayapp.data.pairs; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- Ray Data pipeline

def test_pipeline_rows_equal_shared_preprocessing(ray_cluster, synth_dir):
    import torch

    from rayapp.data.pipeline import (
        OUTPUT_COLUMNS,
        build_pair_dataset,
        build_pair_rows,
        torch_batches,
    )
    from rayapp.model.images import load_image, preprocess_pil
    from rayapp.model.tokenizer import load_tokenizer

    ds = build_pair_dataset(synth_dir / "train", image_size=PIPE_SIZE, tokenizer_dir=synth_dir / "tokenizer",
                            max_length=MAX_LEN, shuffle_seed=5, with_ids=True, preprocess_actors=1)
    rows = []
    for batch in torch_batches(ds, batch_size=16):
        assert set(OUTPUT_COLUMNS) <= set(batch)
        assert batch["pixels_better"].dtype == batch["pixels_worse"].dtype == torch.float32
        assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.int64
        assert tuple(batch["pixels_worse"].shape[1:]) == (3, PIPE_SIZE, PIPE_SIZE)
        assert tuple(batch["input_ids"].shape[1:]) == (MAX_LEN,)
        rows.extend({k: batch[k][i] for k in batch} for i in range(len(batch["pair_id"])))
    expected = {f"{p['id']}:{p['better']}>{p['worse']}": p for p in iter_pairs(synth_dir / "train")}
    assert sorted(r["pair_id"] for r in rows) == sorted(expected)  # every pair exactly once
    assert [r["pair_id"] for r in rows] != list(expected)  # shuffled (expected is in file order)
    tokenizer = load_tokenizer(synth_dir / "tokenizer")
    for row in rows[:6]:
        pair = expected[row["pair_id"]]
        better = preprocess_pil(load_image(pair["image_better"]), PIPE_SIZE)
        worse = preprocess_pil(load_image(pair["image_worse"]), PIPE_SIZE)
        assert torch.equal(row["pixels_better"], better) and torch.equal(row["pixels_worse"], worse)
        enc = tokenizer([pair["prompt"]], padding="max_length", truncation=True, max_length=MAX_LEN)
        assert row["input_ids"].tolist() == enc["input_ids"][0]
        assert row["attention_mask"].tolist() == enc["attention_mask"][0]
        assert row["pair_kind"] == pair["pair_kind"]
    # the shuffle is seeded: built again with the same seed, the same order; the encoded-pair view has every pair
    again = build_pair_dataset(synth_dir / "train", image_size=PIPE_SIZE, tokenizer_dir=synth_dir / "tokenizer",
                               max_length=MAX_LEN, shuffle_seed=5, with_ids=True, concurrency=2)
    assert [str(p) for b in again.iter_batches(batch_size=64, batch_format="numpy") for p in b["pair_id"]] == \
        [r["pair_id"] for r in rows]
    encoded = build_pair_rows(synth_dir / "train", shuffle_seed=5).take_all()
    assert sorted(str(r["pair_id"]) for r in encoded) == sorted(expected)
    assert all(bytes(r["image_better"]) == expected[str(r["pair_id"])]["image_better"] for r in encoded)


def test_train_shards_are_balanced_and_disjoint(ray_cluster, synth_dir):
    from rayapp.data.pipeline import build_train_val_datasets, train_data_config

    datasets = build_train_val_datasets(synth_dir, image_size=PIPE_SIZE, max_length=MAX_LEN, shuffle_seed=1,
                                        with_ids=True, preprocess_actors=1)
    assert set(datasets) == {"train", "val"}
    total = pair_stats(synth_dir / "train")["pairs"]
    # exactly what Ray Train does per dataset for `get_dataset_shard` (v2 DatasetManager -> DataConfig.configure)
    per_rank = train_data_config().configure(datasets={"train": datasets["train"]}, world_size=2,
                                            worker_handles=None, worker_node_ids=None)
    shards = [per_rank[rank]["train"] for rank in (0, 1)]
    seen: list[list[str]] = [[], []]

    def consume(rank: int) -> None:
        for batch in shards[rank].iter_batches(batch_size=8, batch_format="numpy"):
            seen[rank].extend(str(p) for p in batch["pair_id"])

    threads = [threading.Thread(target=consume, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "streaming_split consumers hung"
    assert len(seen[0]) == len(seen[1]) == total // 2
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == len(seen[0]) + len(seen[1])


# ---------------------------------------------------------------- ImageRewardDB as published on the hub

def _webp(colour, size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def _irdb_record(split, part, name, prompt_id, prompt, total, rank, ratings, cls="People"):
    return {"image_path": f"images/{split}/{part}/{name}.webp", "prompt_id": prompt_id, "prompt": prompt,
            "classification": cls, "image_amount_in_total": total, "rank": rank, "overall_rating": ratings[0],
            "image_text_alignment_rating": ratings[1], "fidelity_rating": ratings[2]}


# prompt id -> (split, part, prompt, [(rank, (overall, alignment, fidelity))]); the good groups of the replica
IRDB_GOOD = {
    "000001-0001": ("train", "train_1", "a cat on a sofa", [(2, (5, 6, 4)), (1, (7, 7, 6)), (2, (5, 4, 5))]),
    "000002-0002": ("train", "train_2", "a red car", [(1, (6, 5, 6)), (2, (3, 2, 4))]),
    "000003-0003": ("train", "train_3", "two dogs", [(1, (4, 4, 4)), (1, (4, 4, 4)), (3, (1, 2, 1))]),
    "000004-0004": ("train", "train_4", "a blue house", [(3, (2, 2, 3)), (2, (4, 3, 4)), (1, (6, 6, 7))]),
    "000005-0005": ("train", "train_5", "outside the 1k subset", [(1, (5, 5, 5)), (2, (2, 2, 2))]),
    "000010-0010": ("validation", "validation_1", "a mountain lake", [(1, (6, 6, 6)), (2, (3, 3, 3))]),
    "000020-0020": ("test", "test_1", "an old robot", [(2, (3, 4, 3)), (1, (6, 5, 6)), (3, (1, 1, 2))]),
}
IRDB_BAD = {"000006-0006": "image_amount_in_total", "000007-0007": "missing image",
            "000008-0008": "cannot decode", "000009-0009": "prompt"}


@pytest.fixture(scope="module")
def irdb_root(tmp_path_factory) -> tuple[Path, dict]:
    """A small replica of the hub layout: train zips 1-5 (train_2's JSON and images under a folder inside the
    zip), validation extracted to a folder, a test zip without its JSON (records only in metadata-test.parquet),
    metadata-*.parquet for every split, and four bad groups in train_2. Returns (root, image bytes by path)."""
    import zipfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("irdb") / "ImageRewardDB"
    by_part: dict[tuple, list] = {}
    images: dict[str, bytes] = {}
    colour = 0
    for pid, (split, part, prompt, items) in IRDB_GOOD.items():
        for k, (rank, ratings) in enumerate(items):
            record = _irdb_record(split, part, f"{pid}-{k}", pid, prompt, len(items), rank, ratings)
            colour += 1
            images[record["image_path"]] = _webp((colour * 37 % 256, colour * 91 % 256, colour * 13 % 256))
            by_part.setdefault((split, part), []).append(record)
    bad = [  # all in train_2
        _irdb_record("train", "train_2", "count-0", "000006-0006", "three images promised", 3, 1, (5, 5, 5)),
        _irdb_record("train", "train_2", "count-1", "000006-0006", "three images promised", 3, 2, (4, 4, 4)),
        _irdb_record("train", "train_2", "here", "000007-0007", "one image is gone", 2, 1, (5, 5, 5)),
        _irdb_record("train", "train_2", "gone", "000007-0007", "one image is gone", 2, 2, (4, 4, 4)),
        _irdb_record("train", "train_2", "fine", "000008-0008", "one image is corrupt", 2, 1, (5, 5, 5)),
        _irdb_record("train", "train_2", "corrupt", "000008-0008", "one image is corrupt", 2, 2, (4, 4, 4)),
        _irdb_record("train", "train_2", "e0", "000009-0009", "  ", 2, 1, (5, 5, 5)),
        _irdb_record("train", "train_2", "e1", "000009-0009", "  ", 2, 2, (4, 4, 4)),
    ]
    for record in bad:
        name = record["image_path"].rsplit("/", 1)[1]
        if name != "gone.webp":
            images[record["image_path"]] = b"RIFF\x00\x00junk" if name == "corrupt.webp" else _webp((9, 9, 9))
        by_part[("train", "train_2")].append(record)
    for (split, part), records in by_part.items():
        folder = root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        if split == "validation":  # extracted form
            (folder / part).mkdir()
            (folder / part / f"{part}.json").write_text(json.dumps(records))
            for r in records:
                (folder / part / r["image_path"].rsplit("/", 1)[1]).write_bytes(images[r["image_path"]])
            continue
        prefix = f"{part}/" if part == "train_2" else ""
        with zipfile.ZipFile(folder / f"{part}.zip", "w") as zf:
            if split != "test":
                zf.writestr(f"{prefix}{part}.json", json.dumps(records))
            for r in records:
                if r["image_path"] in images:
                    zf.writestr(prefix + r["image_path"].rsplit("/", 1)[1], images[r["image_path"]])
    for split in ("train", "validation", "test"):
        rows = [r for (s, _), records in sorted(by_part.items()) if s == split for r in records]
        pq.write_table(pa.Table.from_pylist(rows), root / f"metadata-{split}.parquet")
    return root, images


def _check_irdb_rows(out: Path, images: dict, ids) -> None:
    """The written rows equal the replica: prompt, image bytes in source order, ranks, ratings, classification."""
    rows = {r["id"]: r for r in iter_comparisons(out)}
    assert sorted(rows) == sorted(ids)
    for pid in ids:
        split, part, prompt, items = IRDB_GOOD[pid]
        row = rows[pid]
        assert row["prompt"] == prompt and row["ranking"] == [rank for rank, _ in items]
        assert row["images"] == [images[f"images/{split}/{part}/{pid}-{k}.webp"] for k in range(len(items))]
        for c, name in enumerate(("overall_rating", "image_text_alignment_rating", "fidelity_rating")):
            assert row[name] == [ratings[c] for _, ratings in items], (pid, name)
        assert row["classification"] == ["People"] * len(items)


def test_imagerewarddb_hub_layout_all_splits(irdb_root, tmp_path, capsys):
    from rayapp.cli import main

    root, images = irdb_root
    out = tmp_path / "irdb"
    args = ["data", "convert", str(root), "--format", "imagerewarddb", "--out", str(out)]
    assert main(args + ["--split", "train"]) == 1  # bad groups fail the run, each named, nothing written
    err = capsys.readouterr().err
    for pid, words in IRDB_BAD.items():
        assert pid in err and any(words in line for line in err.splitlines() if pid in line), (pid, err)
    assert not (out / "train").exists() and not [p for p in out.iterdir()]  # no half-written split
    assert main(args + ["--split", "all", "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "validation"]
    assert all(f"skipped {pid}:" in captured.err for pid in IRDB_BAD)
    train = [p for p, v in IRDB_GOOD.items() if v[0] == "train"]
    _check_irdb_rows(out / "train", images, train)
    _check_irdb_rows(out / "validation", images, ["000010-0010"])  # read from the extracted folder
    _check_irdb_rows(out / "test", images, ["000020-0020"])  # zip without JSON: records from metadata-test.parquet
    # pairs: ties give none (ranks 1,1,3 -> 2 pairs; 2,1,2 -> 2 pairs)
    stats = pair_stats(out / "train")
    assert (stats["prompts"], stats["images"], stats["pairs"], stats["tied_pairs"]) == (5, 13, 9, 2)
    assert stats["ratings"]["overall_rating"] == {1: 1, 2: 2, 3: 1, 4: 3, 5: 3, 6: 2, 7: 1}
    assert main(["data", "stats", str(out / "train")]) == 0
    printed = capsys.readouterr().out
    assert "5 prompts, 13 images, 9 unequal-rank pairs (human 9), 2 tied pairs" in printed
    assert "overall_rating: 1: 1 " in printed and "fidelity_rating:" in printed and "People 13" in printed


def test_imagerewarddb_subset_and_auto(irdb_root, tmp_path, capsys):
    from rayapp.cli import main

    root, images = irdb_root
    out = tmp_path / "sub"
    assert main(["data", "convert", str(root), "--split", "train", "--subset", "1k", "--skip-bad",
                 "--out", str(out)]) == 0
    assert "as imagerewarddb (found metadata-test.parquet" in capsys.readouterr().err
    # 1k = the first 4 train zips: train_5's prompt is left out
    _check_irdb_rows(out / "train", images, [p for p, v in IRDB_GOOD.items() if v[1] in
                                             ("train_1", "train_2", "train_3", "train_4")])
    assert main(["data", "convert", str(root), "--split", "train", "--subset", "2k", "--skip-bad",
                 "--out", str(tmp_path / "two")]) == 2
    assert "train_6.zip" in capsys.readouterr().err  # names what is missing
    assert main(["data", "convert", str(root), "--split", "nope", "--out", str(tmp_path / "x")]) == 2


# ---------------------------------------------------------------- pair tables (Pick-a-Pic, plain, datasets-style)

def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 12), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_pickapic_table_ties_labels_and_bad_rows(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayapp.cli import main

    a, b = _png((200, 0, 0)), _png((0, 0, 200))
    rows = [  # ranking_id, caption, jpg_0, jpg_1, label_0, label_1, has_label
        (11, "a red square", a, b, 1.0, 0.0, True),
        (12, "a blue square", a, b, 0.0, 1.0, True),
        (13, "a tie", a, b, 0.5, 0.5, True),
        (14, "no label", a, b, 0.5, 0.5, False),
        (15, "corrupt", a, b"\xff\xd8 not a jpeg", 1.0, 0.0, True),
        (16, "", a, b, 1.0, 0.0, True),
        (17, "nan label", a, b, float("nan"), 1.0, True),
    ]
    names = ["ranking_id", "caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label"]
    table = pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)})
    table = table.append_column("are_different", pa.array([True] * len(rows)))
    source = tmp_path / "pickapic" / "train-00000.parquet"
    source.parent.mkdir()
    pq.write_table(table, source)
    out = tmp_path / "out"
    assert main(["data", "convert", str(source.parent), "--out", str(out), "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "as pickapic" in captured.err
    assert {line.split(":")[0] for line in captured.err.splitlines() if line.startswith("skipped")} == \
        {"skipped 14", "skipped 15", "skipped 16", "skipped 17"}
    got = {r["id"]: r for r in iter_comparisons(out)}
    assert {k: v["ranking"] for k, v in got.items()} == {"11": [1, 2], "12": [2, 1], "13": [1, 1]}
    assert got["12"]["images"] == [a, b] and got["13"]["prompt"] == "a tie"
    assert pair_stats(out)["pairs"] == 2  # the tie gives no pair


def test_pairs_table_with_datasets_image_dicts_and_paths(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayapp.data.formats import convert_source
    from rayapp.model.images import load_image

    good, bad = _png((10, 200, 10)), _png((90, 90, 90))
    (tmp_path / "t" / "img").mkdir(parents=True)
    (tmp_path / "t" / "img" / "worse.png").write_bytes(bad)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image() storage
    table = pa.table({
        "prompt": ["a green square", "a grey square", "missing file"],
        "image_better": pa.array([{"bytes": good, "path": "g.png"}, {"bytes": bad, "path": None},
                                  {"bytes": good, "path": None}], type=image),
        "image_worse": pa.array([{"bytes": None, "path": "img/worse.png"}, {"bytes": good, "path": "x.png"},
                                 {"bytes": None, "path": "img/nope.png"}], type=image),
    })
    pq.write_table(table, tmp_path / "t" / "pairs.parquet")
    # load_image takes the dicts as they come out of a table
    cell = table["image_better"].to_pylist()[0]
    assert load_image(cell).size == (20, 12)
    reports = convert_source(tmp_path / "t" / "pairs.parquet", tmp_path / "out", skip_bad=True, progress=False)
    assert reports[0].format == "pairs" and "auto picked pairs" in reports[0].note
    assert reports[0].bad == [("pairs.parquet:2", f"image_worse: missing image file {tmp_path / 't' / 'img/nope.png'}")]
    got = list(iter_comparisons(tmp_path / "out"))
    assert [(r["id"], r["ranking"]) for r in got] == [("pairs.parquet:0", [1, 2]), ("pairs.parquet:1", [1, 2])]
    assert got[0]["images"] == [good, bad] and got[1]["images"] == [bad, good]


def test_auto_format_says_what_it_needs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rayapp.data.formats import convert_source

    pq.write_table(pa.table({"text": ["x"], "picture": [b"y"]}), tmp_path / "odd.parquet")
    with pytest.raises(ValueError, match="caption, jpg_0, jpg_1, label_0, label_1") as info:
        convert_source(tmp_path / "odd.parquet", tmp_path / "o", progress=False)
    assert "picture, text" in str(info.value)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        convert_source(tmp_path / "nothing-here", tmp_path / "o", progress=False)
