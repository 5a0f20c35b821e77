"""The one scorer registry: every name and alias, in any case, resolves the same way through `--reward`,
`--scorer`, `rayapp.load_score`, `rayapp score --model` and the Serve `scorer:` field; an unknown name gets
the same error everywhere; a new scorer is one registration."""
from __future__ import annotations

import argparse

import pytest
import torch

# every name rayapp knows today, with the canonical one it stands for
NAMES = {"ImageReward": "ImageReward", "ImageReward-v1.0": "ImageReward", "CLIP": "CLIP", "BLIP": "BLIP",
         "Aesthetic": "Aesthetic", "PickScore": "PickScore", "PickScore_v1": "PickScore", "HPSv2": "HPSv2",
         "HPSv2.0": "HPSv2", "HPS_v2": "HPSv2", "HPSv2.1": "HPSv2.1", "HPS_v2.1": "HPSv2.1"}
SPELLINGS = [(variant, canonical) for name, canonical in NAMES.items()
             for variant in dict.fromkeys((name, name.lower(), name.upper(), name.swapcase()))]


def _spec_parsers():
    """Every parser of scorer text, as (entry point, text -> canonical name)."""
    from rayapp import scorers
    from rayapp.eval.scorers import parse_spec
    from rayapp.refl.rewards import absolute_reward_paths, parse_reward
    from rayapp.serve.config import ModelSpec

    def reward(text):
        (term,) = parse_reward(f"{text}:0.5")
        assert term.weight == 0.5 and absolute_reward_paths(f"{text}:0.5") == f"{text}:0.5"
        return scorers.parse_spec(term.source).name

    return {
        "registry": lambda text: scorers.parse_spec(text).name,
        "--scorer": lambda text: parse_spec(text).scorer,
        "--reward": reward,
        "serve scorer:": lambda text: ModelSpec(id="m", scorer=text).scorer,
        "load_score": lambda text: scorers.registration(text).name,
    }


@pytest.mark.parametrize("entry", ["registry", "--scorer", "--reward", "serve scorer:", "load_score"])
@pytest.mark.parametrize("text, canonical", SPELLINGS)
def test_every_name_in_any_case_at_every_entry_point(entry, text, canonical):
    assert _spec_parsers()[entry](text) == canonical


@pytest.mark.parametrize("entry", ["registry", "--scorer", "--reward", "serve scorer:", "load_score"])
def test_unknown_name_same_error_everywhere(entry):
    from rayapp import scorers

    expected = "unknown scorer 'PickScore-v9'; available scores (any case): ImageReward (or ImageReward-v1.0), " \
               "CLIP, BLIP, Aesthetic, PickScore (or PickScore_v1), HPSv2 (or HPSv2.0, HPS_v2), HPSv2.1 (or HPS_v2.1)"
    assert scorers.unknown_message("PickScore-v9") == expected
    with pytest.raises(ValueError) as caught:
        _spec_parsers()[entry]("PickScore-v9")
    assert expected in str(caught.value)


def test_spec_grammar():
    from rayapp import scorers
    from rayapp.eval.scorers import parse_spec

    assert scorers.parse_spec("tiny") == scorers.parse_spec("imagereward:TINY") == scorers.ScorerRef("ImageReward",
                                                                                                       tiny=True)
    assert scorers.parse_spec("clip:tiny").to_string() == "CLIP:tiny"
    assert scorers.parse_spec("s3://bucket/rm") == scorers.ScorerRef("ImageReward", "s3://bucket/rm")
    with pytest.raises(scorers.UnknownScorerError, match="NAME:tiny"):
        scorers.parse_spec("clip:huge")
    labelled = parse_spec("mine=blip:tiny")
    assert (labelled.label, labelled.column, labelled.to_string()) == ("mine", "score_mine", "mine=BLIP:tiny")
    assert parse_spec(labelled.to_string()) == labelled
    # a URI's query string is not a label
    assert parse_spec("s3://b/rm?endpoint_override=x").ref.source == "s3://b/rm?endpoint_override=x"
    with pytest.raises(ValueError, match="already registered for 'ImageReward'"):
        scorers.register("imagereward-V1.0", "x:y")


def _toy_factory(name, path, *, device, dtype, tiny, seed, tokenizer, scale=1.0):
    return {"name": name, "path": path, "tiny": tiny, "seed": seed, "scale": scale, "device": device}


def test_a_new_scorer_is_one_registration(monkeypatch):
    """What PickScore / HPSv2 did: register once, and every entry point knows the name."""
    from rayapp import scorers

    monkeypatch.setattr(scorers, "_REGISTRY", dict(scorers._REGISTRY))
    monkeypatch.setattr(scorers, "_NAMES", dict(scorers._NAMES))
    scorers.register("ToyScore", f"{__name__}:_toy_factory", aliases=("Toy-v2",), options=("scale",))
    for entry, parse in _spec_parsers().items():
        assert parse("toy-V2") == "ToyScore", entry
    built = scorers.load_score("TOYSCORE", "cpu", config="tiny", seed=3, scale=2.0)
    assert built == {"name": "ToyScore", "path": None, "tiny": True, "seed": 3, "scale": 2.0, "device": "cpu"}
    with pytest.raises(TypeError, match=r"takes the options \['scale'\], not \['weights'\]"):
        scorers.load_score("toyscore", weights="x")
    assert "ToyScore (or Toy-v2)" in scorers.unknown_message("nope")


# ----------------------------------------------------------------------------- one real call per entry point
def test_load_score_loads_every_kind(tiny_blip_dir):
    import rayapp

    tiny_rm = rayapp.load_score("imagereward-v1.0", config="tiny", device="cpu", seed=1)
    assert type(tiny_rm).__name__ == "ImageReward" and not tiny_rm.training
    assert isinstance(tiny_rm.score("a red circle", torch.rand(3, 32, 32)), float)
    blip = rayapp.load_score("blip", tiny_blip_dir, device="cpu")
    again = rayapp.load_score("BLIP", f"file://{tiny_blip_dir}", device="cpu")
    image = torch.rand(3, 32, 32)
    assert blip.score("a red circle", image) == pytest.approx(again.score("a red circle", image), abs=1e-6)


def test_eval_scorer_and_serve_spec_load_the_same_model(tiny_blip_dir, tiny_rm_dir):
    import rayapp
    from rayapp.eval.scorers import load_scorer
    from rayapp.serve.config import ModelSpec
    from rayapp.serve.models import load_spec

    image = torch.rand(3, 32, 32)
    expected = rayapp.load_score("BLIP", tiny_blip_dir, device="cpu").score("a cat", image)
    served = load_spec(ModelSpec(id="b", scorer="bLiP", source=str(tiny_blip_dir)), "cpu", None)
    assert served.score("a cat", image) == pytest.approx(expected, abs=1e-6)
    assert load_scorer(str(tiny_blip_dir), device="cpu").score("a cat", image) == pytest.approx(expected, abs=1e-6)
    rm = load_spec(ModelSpec(id="r", scorer="IMAGEREWARD", source=str(tiny_rm_dir)), "cpu", None)
    assert rm.score("a cat", image) == pytest.approx(rayapp.load(tiny_rm_dir, device="cpu").score("a cat", image),
                                                     abs=1e-6)
    tiny = load_spec(ModelSpec(id="t", scorer="clip", options={"config": "tiny", "seed": 4}), "cpu", None)
    assert tiny.score("a cat", image) == pytest.approx(
        rayapp.load_score("CLIP", config="tiny", seed=4, device="cpu").score("a cat", image), abs=1e-6)


def test_reward_is_built_once_and_called(tmp_path):
    from rayapp.refl.rewards import load_reward_model

    cfg = argparse.Namespace(reward="IMAGEREWARD:tiny:1.0,aesthetic:TINY:0.1", reward_seed=0, reward_tokenizer=None)
    reward = load_reward_model(cfg, torch.device("cpu"), torch.float32)
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    values = reward(images, ["a red circle", "two squares"])
    assert values.shape == (2,)
    values.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_rayapp_score_cli_takes_any_scorer_name(tmp_path, capsys):
    from PIL import Image

    from rayapp.score_cli import run

    path = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(path)
    args = argparse.Namespace(images=[str(path)], prompt="a red square", model="Clip:Tiny", endpoint=None,
                              device="cpu", dtype="float32", batch_size=4, json=True)
    assert run(args) == 0
    assert '"model": "Clip:Tiny"' in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown scorer 'PickScore-v9'; available scores"):
        run(argparse.Namespace(**{**vars(args), "model": "PickScore-v9"}))
