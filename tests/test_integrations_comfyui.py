"""The ComfyUI nodes against the library's scores, loaded and run the way ComfyUI loads and runs them.

The nodes are imported by tests/comfyui_standin's `nodes.load_custom_node` (a custom-node folder by
path, as ComfyUI does) and run by its `execution.execute` (inputs as lists, ExecutionBlocker, output
nodes), with its `comfy.model_management` ledger; the stand-in is modelled on ComfyUI's source, not
ComfyUI. Scores come from a tiny checkpoint, in-process and through the session's Serve endpoint.
"""
from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO_ROOT, free_port
from PIL import Image

pytestmark = pytest.mark.timeout(300)

STANDIN = Path(__file__).resolve().parent / "comfyui_standin"
COMFY_PACKAGE = REPO_ROOT / "integrations" / "comfyui"
PROMPT = "two red circles on a blue background"
STANDIN_MODULES = ("nodes", "execution", "folder_paths", "comfy", "comfy_execution")


@pytest.fixture(scope="module")
def rm_model(tiny_rm_dir):
    import rayapp

    return rayapp.load(tiny_rm_dir, device="cpu", dtype="float32")


def _forget(names) -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in names:
            del sys.modules[name]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """The stand-in ComfyUI on sys.path, this project's folder installed and loaded as a custom node."""
    root = tmp_path_factory.mktemp("comfyui")
    sys.path.insert(0, str(STANDIN))
    try:
        import execution
        import folder_paths
        import nodes
        from comfy import model_management

        folder_paths.output_directory = str(root / "output")
        pack = root / "custom_nodes" / "rayapp_imagereward"
        shutil.copytree(COMFY_PACKAGE, pack, ignore=shutil.ignore_patterns("__pycache__"))
        assert nodes.load_custom_node(str(pack))
        yield SimpleNamespace(nodes=nodes, execution=execution, folder_paths=folder_paths, mm=model_management,
                              root=root, package=sys.modules["rayapp_imagereward"])
    finally:
        sys.path.remove(str(STANDIN))
        _forget((*STANDIN_MODULES, "rayapp_imagereward", "other_reward_pack", "rayapp_imagereward_2"))


def call_node(comfy, key: str, **inputs):
    """One node call as the executor makes it: inputs checked against INPUT_TYPES, outputs by name."""
    cls = comfy.nodes.NODE_CLASS_MAPPINGS[key]
    spec = cls.INPUT_TYPES()
    assert not set(spec["required"]) - set(inputs), f"missing required inputs of {key}"
    assert not set(inputs) - set(spec["required"]) - set(spec.get("optional", {})), f"unknown inputs of {key}"
    import torch

    with torch.inference_mode():  # ComfyUI's executor runs every node inside inference mode
        outputs = getattr(cls(), cls.FUNCTION)(**inputs)
    if isinstance(outputs, dict):
        outputs = outputs["result"]
    assert isinstance(outputs, tuple) and len(outputs) == len(cls.RETURN_TYPES)
    return dict(zip(cls.RETURN_NAMES, outputs))


def comfy_batch(count: int, height: int = 64, width: int = 80, seed: int = 0):
    """A ComfyUI IMAGE batch [B, H, W, 3] in 0-1, with values where truncation and rounding to 8 bits differ."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    batch = torch.rand((count, height, width, 3), generator=gen)
    batch[:, :4] = 0.9999  # 254.97 -> 254 by SaveImage, 255 if rounded
    batch[:, -2:, :, 0] = 1.5  # out of range: clipped
    return batch


def save_image_like_comfyui(images) -> list[Image.Image]:
    """ComfyUI SaveImage's conversion, written out here as the test's oracle."""
    return [Image.fromarray(np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)) for image in images]


@pytest.fixture
def image_source(comfy):
    """A node that outputs a fixed IMAGE batch (what VAE Decode would hand on), registered for one test."""
    batches = {}

    class TestImages:
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "make"
        CATEGORY = "test"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"name": ("STRING", {})}}

        def make(self, name):
            return (batches[name],)

    comfy.nodes.NODE_CLASS_MAPPINGS["TestImages"] = TestImages
    yield batches
    del comfy.nodes.NODE_CLASS_MAPPINGS["TestImages"]


def workflow(model: str, batch: str, tail: dict) -> dict:
    """An API-format prompt: a Loader (node 1), an image batch (node 2), then the given nodes."""
    return {"1": {"class_type": "RayappImageRewardLoader", "inputs": {"model": model, "device": "auto",
                                                                      "dtype": "float32"}},
            "2": {"class_type": "TestImages", "inputs": {"name": batch}}, **tail}


# ---------------------------------------------------------------- loading and conventions
def test_comfyui_nodes_load_as_a_custom_node_with_prefixed_keys(comfy):
    registry = comfy.nodes.NODE_CLASS_MAPPINGS
    prefixed = ["RayappImageRewardLoader", "RayappImageRewardScore", "RayappImageRewardFilter"]
    for key in prefixed:
        cls = registry[key]
        assert cls.RELATIVE_PYTHON_MODULE == "custom_nodes.rayapp_imagereward" and cls.CATEGORY == "ImageReward"
        assert not getattr(cls, "DEPRECATED", False)
        spec = cls.INPUT_TYPES()
        for entry in [*spec["required"].values(), *spec.get("optional", {}).values()]:
            assert isinstance(entry, tuple) and isinstance(entry[0], (str, list))
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(getattr(cls, "OUTPUT_IS_LIST", cls.RETURN_TYPES))
        assert callable(getattr(cls, cls.FUNCTION))
        old = registry[key.removeprefix("Rayapp")]  # the old key: the same node, hidden as deprecated
        assert issubclass(old, cls) and old.DEPRECATED is True
    assert comfy.nodes.NODE_DISPLAY_NAME_MAPPINGS["RayappImageRewardScore"] == "ImageReward Score (rayapp)"
    assert registry["RayappImageRewardScore"].OUTPUT_NODE is True
    assert registry["RayappImageRewardFilter"].RETURN_TYPES[:3] == ("IMAGE", "FLOAT", "BOOLEAN")


def test_comfyui_old_keys_never_replace_another_pack(comfy, tmp_path):
    registry = comfy.nodes.NODE_CLASS_MAPPINGS
    saved = dict(registry)
    other = tmp_path / "other_reward_pack"
    other.mkdir()
    (other / "__init__.py").write_text(
        "class Loader:\n    pass\n\nclass Score:\n    pass\n\n"
        "NODE_CLASS_MAPPINGS = {'ImageRewardLoader': Loader, 'ImageRewardScore': Score}\n")
    try:
        for key in [k for k in registry if "ImageReward" in k]:
            del registry[key]
        assert comfy.nodes.load_custom_node(str(other))
        ours = tmp_path / "rayapp_imagereward_2"
        shutil.copytree(COMFY_PACKAGE, ours, ignore=shutil.ignore_patterns("__pycache__"))
        assert comfy.nodes.load_custom_node(str(ours))
        assert registry["ImageRewardLoader"].__module__ == "other_reward_pack"  # the other pack keeps its keys
        assert registry["ImageRewardScore"].__module__ == "other_reward_pack"
        assert registry["RayappImageRewardLoader"].__module__ == "rayapp_imagereward_2.nodes"
        assert registry["ImageRewardFilter"].__module__ == "rayapp_imagereward_2.nodes"  # a free key: the alias
    finally:
        registry.clear()
        registry.update(saved)


# ---------------------------------------------------------------- scores
def test_comfyui_score_equals_library_on_saveimage_pixels(comfy, rm_model, tiny_rm_dir, tmp_path):
    scorer = call_node(comfy, "RayappImageRewardLoader", model=str(tiny_rm_dir), device="cpu",
                       dtype="float32")["imagereward"]
    batch = comfy_batch(4)
    out = call_node(comfy, "RayappImageRewardScore", imagereward=scorer, images=batch, prompt=PROMPT)
    pictures = save_image_like_comfyui(batch)
    rounded = (np.clip(batch[0].numpy(), 0, 1) * 255).round().astype(np.uint8)
    assert not np.array_equal(np.asarray(pictures[0]), rounded)  # the conversion choice matters for this batch
    assert out["scores"] == rm_model.score(PROMPT, pictures)  # same pixels, same call: identical
    best = max(range(4), key=lambda i: out["scores"][i])
    assert f"#1 image {best}: {out['scores'][best]:.4f}" in out["summary"] and "4 images" in out["summary"]


def test_comfyui_filter(comfy, tiny_rm_dir):
    scorer = call_node(comfy, "RayappImageRewardLoader", model=str(tiny_rm_dir), device="cpu",
                       dtype="float32")["imagereward"]
    batch = comfy_batch(5, seed=3)
    scores = call_node(comfy, "RayappImageRewardScore", imagereward=scorer, images=batch, prompt=PROMPT)["scores"]
    order = sorted(range(5), key=lambda i: -scores[i])
    limit = (scores[order[2]] + scores[order[3]]) / 2  # three pass the limit
    out = call_node(comfy, "RayappImageRewardFilter", imagereward=scorer, images=batch, prompt=PROMPT,
                    lower_limit=limit, top_k=0)
    assert out["scores"] == [scores[i] for i in order[:3]]
    assert out["images"].shape == (3, 64, 80, 3) and bool((out["images"] == batch[order[:3]]).all())
    assert out["kept"] == [i in order[:3] for i in range(5)] and "kept 3 of 5" in out["summary"]
    top = call_node(comfy, "RayappImageRewardFilter", imagereward=scorer, images=batch, prompt=PROMPT,
                    lower_limit=-100.0, top_k=2)
    assert top["scores"] == [scores[i] for i in order[:2]] and sum(top["kept"]) == 2


def test_comfyui_filter_keeping_nothing_blocks_save_image(comfy, image_source, tiny_rm_dir):
    image_source["five"] = comfy_batch(5, seed=3)
    output = Path(comfy.folder_paths.output_directory)
    before = sorted(output.rglob("*.png")) if output.exists() else []
    prompt = workflow(str(tiny_rm_dir), "five", {
        "3": {"class_type": "RayappImageRewardFilter", "inputs": {"imagereward": ["1", 0], "images": ["2", 0],
                                                                  "prompt": PROMPT, "lower_limit": 100.0,
                                                                  "top_k": 0}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "kept"}},
    })
    run = comfy.execution.execute(prompt)  # without the blocker, SaveImage raised IndexError on images[0]
    assert "3" in run.executed and "4" not in run.executed
    (node, message), = run.blocked_messages
    assert node == "4" and message.startswith("Execution Blocked: ImageReward") and "none of the 5 images" in message
    assert (sorted(output.rglob("*.png")) if output.exists() else []) == before  # nothing was saved

    # With survivors, Save Image writes exactly them, best first.
    prompt["3"]["inputs"].update(lower_limit=-100.0, top_k=2)
    run = comfy.execution.execute(prompt)
    assert "4" in run.executed and run.blocked_messages == []
    saved = [output / item["filename"] for item in run.ui["4"][0]["images"]]
    assert len(saved) == 2
    kept = run.outputs["3"][0][0]
    for path, expected in zip(saved, save_image_like_comfyui(kept)):
        with Image.open(path) as img:
            assert np.array_equal(np.asarray(img), np.asarray(expected))


def test_comfyui_score_is_an_output_node(comfy, image_source, tiny_rm_dir):
    image_source["two"] = comfy_batch(2, seed=7)
    with pytest.raises(comfy.execution.PromptError, match="Prompt has no outputs"):
        comfy.execution.execute(workflow(str(tiny_rm_dir), "two", {}))
    run = comfy.execution.execute(workflow(str(tiny_rm_dir), "two", {
        "3": {"class_type": "RayappImageRewardScore", "inputs": {"imagereward": ["1", 0], "images": ["2", 0],
                                                                 "prompt": PROMPT}}}))
    (text,), = [ui["text"] for ui in run.ui["3"]]
    assert "2 images, best first" in text and run.outputs["3"][1] == [text]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU"))])
def test_comfyui_model_follows_model_management(comfy, tiny_rm_dir, monkeypatch, device):
    import torch

    mm = comfy.mm
    monkeypatch.setattr(mm, "torch_device", torch.device(device))  # what ComfyUI's get_torch_device() picked
    mm.unload_all_models()
    scorer = call_node(comfy, "RayappImageRewardLoader", model=str(tiny_rm_dir), device="auto",
                       dtype="float32")["imagereward"]
    patcher = scorer.patcher
    assert patcher.load_device == mm.get_torch_device() and patcher.offload_device == mm.unet_offload_device()
    assert mm.current_loaded_models == []  # loading the node does not occupy the device yet
    batch = comfy_batch(2, seed=11)
    first = call_node(comfy, "RayappImageRewardScore", imagereward=scorer, images=batch, prompt=PROMPT)["scores"]
    (entry,) = mm.current_loaded_models
    assert entry.model is patcher and patcher.model.model_loaded_weight_memory == mm.module_size(patcher.model) > 0
    assert {p.device.type for p in patcher.model.parameters()} == {device}

    # ComfyUI frees memory for another model: the reward model is offloaded with the others.
    mm.free_memory(mm.device_memory, mm.get_torch_device())
    assert mm.current_loaded_models == [] and patcher.model.model_loaded_weight_memory == 0
    assert patcher.model.device == mm.unet_offload_device()
    assert {p.device.type for p in patcher.model.parameters()} == {"cpu"}
    again = call_node(comfy, "RayappImageRewardScore", imagereward=scorer, images=batch, prompt=PROMPT)["scores"]
    assert again == pytest.approx(first, abs=1e-4) and mm.current_loaded_models[0].model is patcher
    mm.unload_all_models()


def test_comfyui_input_errors(comfy, tiny_rm_dir, tmp_path):
    import torch

    scorer = call_node(comfy, "RayappImageRewardLoader", model=str(tiny_rm_dir), device="cpu",
                       dtype="float32")["imagereward"]
    batch = comfy_batch(2, height=48, width=48)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        call_node(comfy, "RayappImageRewardScore", imagereward=scorer, images=torch.rand(1, 3, 48, 48), prompt=PROMPT)
    with pytest.raises(ValueError, match="prompt is empty"):
        call_node(comfy, "RayappImageRewardScore", imagereward=scorer, images=batch, prompt="  ")
    with pytest.raises(ValueError, match="lower_limit must be a finite number"):
        call_node(comfy, "RayappImageRewardFilter", imagereward=scorer, images=batch, prompt=PROMPT,
                  lower_limit=math.nan, top_k=0)
    with pytest.raises(ValueError, match="connect the output of an 'ImageReward Loader'"):
        call_node(comfy, "RayappImageRewardScore", imagereward="ImageReward-v1.0", images=batch, prompt=PROMPT)
    missing = tmp_path / "missing-model"
    with pytest.raises(RuntimeError, match="cannot load") as err:
        call_node(comfy, "RayappImageRewardLoader", model=str(missing), device="cpu", dtype="float32")
    assert str(missing) in str(err.value)
    with pytest.raises(RuntimeError, match="does not answer"):
        call_node(comfy, "RayappImageRewardLoader", model="", device="auto", dtype="float32",
                  endpoint_url=f"http://127.0.0.1:{free_port()}")


def test_comfyui_endpoint_mode(comfy, rm_model, serve_app):
    scorer = call_node(comfy, "RayappImageRewardLoader", model="ImageReward-v1.0", device="auto", dtype="float32",
                       endpoint_url=serve_app.url)["imagereward"]
    batch = comfy_batch(9, seed=5)  # more than the test endpoint's 8 images per request
    out = call_node(comfy, "RayappImageRewardScore", imagereward=scorer, images=batch, prompt=PROMPT)
    assert out["scores"] == pytest.approx(rm_model.score(PROMPT, save_image_like_comfyui(batch)), abs=1e-5)
    assert f"endpoint {serve_app.url}" in out["summary"]
