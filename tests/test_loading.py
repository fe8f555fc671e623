"""--model accepts pipeline folders, UNet folders, single files and hub ids, and refuses what is unsafe."""

from __future__ import annotations

import hashlib

import shutil

import pytest
import torch
from safetensors.torch import save_file

from asdm_export.errors import FetchError, InputError
from asdm_export.models.loading import resolve_model


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pipeline_folder_and_unet_folder_load_the_same_unet(tiny_dir):
    pipe_src = resolve_model(str(tiny_dir))
    unet_src = resolve_model(str(tiny_dir / "unet"))
    assert (pipe_src.kind, unet_src.kind) == ("pipeline", "unet")
    assert _same_weights(pipe_src.load_unet(), unet_src.load_unet())


def test_preset_id_resolves_to_a_cached_pipeline_folder(tiny_dir):
    src = resolve_model("asdm:tiny")
    assert src.kind == "preset" and src.path == tiny_dir
    assert len(src.sha256) == 64
    assert src.sha256 == folder_sha256(tiny_dir)
    assert resolve_model(str(tiny_dir / "unet")).sha256 == folder_sha256(tiny_dir / "unet")
    weights = tiny_dir / "unet" / "diffusion_pytorch_model.safetensors"
    assert resolve_model(str(weights)).sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()


def folder_sha256(folder) -> str:
    """The documented identity of a model folder, computed here with hashlib alone: sha256 over the sorted
    lines 'relative/path NUL sha256(file)' of every file under it."""
    lines = sorted((p.relative_to(folder).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
                   for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256("".join(f"{rel}\0{sha}\n" for rel, sha in lines).encode()).hexdigest()


def test_single_file_checkpoint_loads(tiny_dir, tmp_path):
    reference = resolve_model(str(tiny_dir)).load_unet()
    ckpt = tmp_path / "tiny-unet.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(ckpt))
    src = resolve_model(str(ckpt), config=str(tiny_dir))
    assert src.kind == "single-file"
    assert _same_weights(src.load_unet(), reference)


def test_single_file_without_config_says_what_to_pass(tiny_dir, tmp_path):
    ckpt = tmp_path / "unet.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, str(ckpt))
    with pytest.raises(InputError, match="--config"):
        resolve_model(str(ckpt)).load_unet()


def test_original_layout_checkpoint_loads_every_part_exactly(tiny_dir, tmp_path):
    """A whole pipeline in the original (LDM) key layout: diffusers converts it back to the same weights."""
    from ldm_layout import save_ldm_checkpoint

    reference = resolve_model(str(tiny_dir)).load_pipeline()
    ckpt = save_ldm_checkpoint(reference, tmp_path / "tiny-ldm.safetensors")
    src = resolve_model(str(ckpt), config="asdm:tiny")
    assert src.has_pipeline and src.unet_folder is None
    assert src.config == str(tiny_dir)  # a preset as --config is recorded as its folder, absolute
    loaded = src.load_pipeline()
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(reference, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys(), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert src.load_unet() is loaded.unet  # the file is read once


def test_original_layout_without_config_says_to_pass_config(tiny_dir, tmp_path, monkeypatch):
    from ldm_layout import save_ldm_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = resolve_model(str(tiny_dir)).load_pipeline()
    whole = save_ldm_checkpoint(pipe, tmp_path / "whole.safetensors")
    unet = save_ldm_checkpoint(pipe, tmp_path / "unet.safetensors", parts=("unet",))
    assert resolve_model(str(whole)).has_pipeline and not resolve_model(str(unet)).has_pipeline
    with pytest.raises(InputError, match=r"original SD key layout.*pass --config"):
        resolve_model(str(whole)).load_pipeline()
    with pytest.raises(InputError, match=r"original SD key layout.*pass --config"):
        resolve_model(str(unet)).load_unet()
    with pytest.raises(InputError, match="UNet only"):
        resolve_model(str(unet), config=str(tiny_dir)).load_pipeline()
    with pytest.raises(InputError, match="--config 'nowhere' not found"):
        resolve_model(str(unet), config="nowhere")


def test_pickled_weights_are_refused_unless_allowed(tiny_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dir, folder)
    unet_dir = folder / "unet"
    state = resolve_model(str(tiny_dir)).load_unet().state_dict()
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(InputError, match="--allow-pickle"):
        resolve_model(str(folder)).load_unet()
    unet = resolve_model(str(folder), allow_pickle=True).load_unet()
    assert torch.equal(unet.state_dict()["conv_in.weight"], state["conv_in.weight"])


def test_pickled_single_file_is_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(InputError, match="pickled"):
        resolve_model(str(ckpt))


def test_missing_and_corrupt_models_are_clear_errors(tiny_dir, tmp_path):
    with pytest.raises(InputError, match="not found"):
        resolve_model(str(tmp_path / "nope"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(InputError, match="not a readable safetensors"):
        resolve_model(str(bad))
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(InputError, match="diffusion_pytorch_model.safetensors' is not a readable safetensors"):
        resolve_model(str(folder)).load_unet()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="neither a diffusers pipeline"):
        resolve_model(str(empty))


def test_hub_id_offline_is_a_fetch_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FetchError, match="Hugging Face Hub"):
        resolve_model("someone/not-a-cached-model")


def test_unsupported_unet_config_is_refused(tiny_dir, tmp_path):
    import json

    folder = tmp_path / "sdxl-like"
    shutil.copytree(tiny_dir / "unet", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["addition_embed_type"] = "text"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="not supported"):
        resolve_model(str(folder)).load_unet()
