"""The embedded models: SD-shaped, deterministic, and readable by diffusers like any checkpoint."""

from __future__ import annotations

import json
import re

import pytest
import torch

from asdm_export.artifacts import hash_files
from asdm_export.models.presets import PRESETS, SD1_DOWN, SD1_UP, get_preset, write_preset
from asdm_export.errors import InputError


def test_tiny_is_sd1_shaped_and_loads_with_diffusers(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), use_safetensors=True)
    cfg = pipe.unet.config
    assert tuple(cfg.down_block_types) == SD1_DOWN
    assert tuple(cfg.up_block_types) == SD1_UP
    assert cfg.layers_per_block == 2
    assert pipe.unet.mid_block.attentions  # the mid block has cross-attention
    assert sum(p.numel() for p in pipe.unet.parameters()) < 5e6  # small enough for seconds-long tests
    ids = pipe.tokenizer("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids.shape == (1, 77)
    # whole-word merges: "a red circle" is BOS + 3 tokens + EOS
    assert (ids[0] != pipe.tokenizer.pad_token_id).sum() == 4
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
    assert emb.shape == (1, 77, cfg.cross_attention_dim)


def test_same_seed_gives_byte_identical_weights(tmp_path):
    preset = get_preset("asdm:tiny")
    write_preset(preset, tmp_path / "a")
    write_preset(preset, tmp_path / "b")
    a, b = hash_files(tmp_path / "a"), hash_files(tmp_path / "b")
    assert a == b
    assert any(name.endswith(".safetensors") for name in a)


def test_sd15_preset_is_the_sd15_unet():
    from diffusers import UNet2DConditionModel

    cfg = PRESETS["sd15"].unet
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    n = sum(p.numel() for p in unet.parameters())
    assert n == 859_520_964  # SD1.5's published UNet size (859.5M)


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(InputError, match="unknown embedded model"):
        get_preset("asdm:nope")


def test_preset_folder_records_its_recipe(tiny_dir):
    info = json.loads((tiny_dir / "asdm_preset.json").read_text())
    assert info["preset"] == "tiny" and info["seed"] == 0


def test_an_unwritable_cache_is_one_line_naming_the_setting_that_moves_it(tmp_path, monkeypatch):
    """An embedded model written into a cache that cannot be written: the line asked for "another output path",
    which the user never gave; it names ASDM_EXPORT_CACHE."""
    from click.testing import CliRunner

    from asdm_export.cli import main

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("ASDM_EXPORT_CACHE", str(tmp_path / "file" / "cache"))
    for model in ("asdm:tiny", "asdm:toyworld-bk-small"):  # made in code; a shipped student joined to its teacher
        r = CliRunner().invoke(main, ["export", "--model", model, "--out", str(tmp_path / "b")])
        assert r.exit_code == 2, r.output
        cache = re.escape(f"{tmp_path}/file")
        assert re.fullmatch(f"error: cannot create the folder '{cache}/cache/models' for '{cache}/cache/models/"
                            f"{model[5:]}-[0-9a-f]+' \\('{cache}' is not a folder\\); set ASDM_EXPORT_CACHE to a "
                            f"writable folder for the embedded model {model}\n", r.stderr), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_a_full_cache_disk_names_the_cache_not_the_output(tmp_path, monkeypatch):
    """The embedded model's cache on a full disk said "write the output elsewhere", and the output had room
    (helper-45): the line names the cache and the setting that moves it, with a full disk's exit code."""
    import errno

    from click.testing import CliRunner

    from asdm_export.cli import main
    from asdm_export.models import presets

    def full(preset, out, overwrite=False):
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    monkeypatch.setenv("ASDM_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(presets, "write_preset", full)
    r = CliRunner().invoke(main, ["export", "--model", "asdm:tiny", "--out", str(tmp_path / "b")])
    assert r.exit_code == 74, r.output
    assert r.stderr == (f"error: no space left for the embedded model asdm:tiny in the cache '{tmp_path}/cache': "
                        "free space there, or set ASDM_EXPORT_CACHE to a folder on another disk\n")
