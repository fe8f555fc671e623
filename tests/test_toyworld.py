"""The toy world: its data, the shipped trained pipeline and judge, the recipe, and ``quality``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from asdm_export.errors import InputError
from asdm_export.models.presets import SHIPPED_ROOT, materialize
from asdm_export.toyworld import world
from asdm_export.toyworld.judge import JudgeRecipe, accuracy, load_judge, train_judge
from asdm_export.toyworld.quality import QualitySettings, frechet_distance, measure_quality, paired_changes, prompt_plan, score
from asdm_export.toyworld.recipe import ToyRecipe, train_toyworld

from test_cli import one_line_error, run

PIPELINE = SHIPPED_ROOT / "pipeline"
JUDGE = SHIPPED_ROOT / "judge"


@pytest.fixture(scope="module")
def judge():
    return load_judge(JUDGE)


# ---- the world ------------------------------------------------------------------------------------
def test_world_is_a_pure_function_of_seed_and_index():
    a, ca, sa = world.sample(3, 17)
    b, cb, sb = world.sample(3, 17)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and (ca, sa) == (cb, sb)
    assert not np.array_equal(a, world.sample(4, 17)[0])
    img, c, s = world.sample(3, 17, colour="cyan", shape="star")
    assert (c, s) == ("cyan", "star")
    with pytest.raises(ValueError):
        world.sample(0, 0, colour="mauve")


def test_world_covers_every_class_and_paints_the_asked_colour():
    images, labels = world.dataset(0, 600)
    assert set(labels) == set(world.classes()) and len(world.classes()) == 24
    for img, (colour, _) in zip(images[:50], labels[:50]):
        # the shape's pixels are the ones far from the light background; their mean is near the colour
        dark = img.astype(float).sum(-1) < 600
        assert dark.sum() > 100
        mean = img[dark].mean(0)
        nearest = min(world.COLOURS, key=lambda k: np.abs(np.array(world.COLOURS[k]) - mean).sum())
        assert nearest == colour


# ---- the shipped pipeline -------------------------------------------------------------------------
def test_shipped_pipeline_is_small_fp16_and_loads_offline_with_plain_diffusers():
    size = sum(p.stat().st_size for p in PIPELINE.rglob("*") if p.is_file())
    assert size <= 12_000_000, size
    from safetensors import safe_open

    with safe_open(str(PIPELINE / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    recipe = json.loads((PIPELINE / "recipe.json").read_text())
    assert recipe["recipe"]["seed"] == 0 and recipe["seconds"]["total"] > 0
    # a separate process with the hub switched off: nothing of ours is imported, only diffusers
    code = (
        "import torch; from diffusers import StableDiffusionPipeline as P; "
        f"p = P.from_pretrained({str(PIPELINE)!r}, torch_dtype=torch.float32); p.set_progress_bar_config(disable=True); "
        "im = p('a red circle', num_inference_steps=2, output_type='np', generator=torch.Generator().manual_seed(0)).images; "
        "print(im.shape, p.vae.config.scaling_factor)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(1, 64, 64, 3)" in out.stdout


def test_asdm_toyworld_resolves_to_the_shipped_folder_and_is_the_default():
    from asdm_export.models.presets import DEFAULT_MODEL

    assert materialize("asdm:toyworld") == PIPELINE
    assert DEFAULT_MODEL == "asdm:toyworld"
    result = run("models")
    assert result.exit_code == 0 and "asdm:toyworld" in result.stdout


def test_make_model_copies_the_shipped_pipeline(tmp_path):
    result = run("make-model", "asdm:toyworld", "--out", tmp_path / "tw")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "tw" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (PIPELINE / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


# ---- the judge ------------------------------------------------------------------------------------
def test_shipped_judge_reads_real_images(judge):
    acc = accuracy(judge, *world.dataset(11, 1000))  # a world seed it never saw
    assert acc["both"] >= 0.98, acc


def test_judge_recipe_trains_and_a_corrupt_judge_is_a_clear_error(tmp_path):
    record = train_judge(tmp_path / "j", JudgeRecipe(steps=60, images=256, eval_images=64))
    # 60 steps learn colour (chance 1/6) long before shape; the recorded figure is the loaded judge's
    assert record["accuracy_on_real"]["colour"] >= 0.6, record
    assert accuracy(load_judge(tmp_path / "j"), *world.dataset(JudgeRecipe().eval_seed, 64)) == \
        record["accuracy_on_real"]
    config = (tmp_path / "j" / "judge.json").read_text()
    (tmp_path / "j" / "judge.json").write_text("{not json")
    with pytest.raises(InputError, match="could not load the judge"):
        load_judge(tmp_path / "j")
    (tmp_path / "j" / "judge.json").write_text(config)
    (tmp_path / "j" / "judge.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="could not load the judge"):
        load_judge(tmp_path / "j")
    with pytest.raises(InputError, match="not a judge folder"):
        load_judge(tmp_path)


# ---- quality --------------------------------------------------------------------------------------
def _with_statistics(rng, n: int, mean, cov) -> np.ndarray:
    """``n`` samples whose sample mean and covariance (np.cov's) are exactly ``mean`` and ``cov``: whitened
    noise, coloured, so that a closed form holds to rounding, not to sampling error."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    # independent axes: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2
    a = _with_statistics(rng, 500, [0.0, 0.0, 0.0], np.diag([1.0, 2.0, 0.5]) ** 2)
    b = _with_statistics(rng, 700, [0.3, 0.0, -0.4], np.diag([1.5, 2.0, 0.5]) ** 2)
    assert frechet_distance(a, b) == pytest.approx(0.3 ** 2 + 0.4 ** 2 + (1.5 - 1.0) ** 2, abs=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-9
    # covariances that do not commute (2-D): Tr sqrt(Sa Sb) = sqrt(Tr(Sa Sb) + 2 sqrt(det Sa det Sb))
    sa, sb = np.array([[2.0, 0.0], [0.0, 0.5]]), np.array([[1.0, 0.8], [0.8, 1.0]])
    a = _with_statistics(rng, 400, [1.0, -1.0], sa)
    b = _with_statistics(rng, 300, [0.0, 0.5], sb)
    trace_root = np.sqrt(np.trace(sa @ sb) + 2 * np.sqrt(np.linalg.det(sa) * np.linalg.det(sb)))
    expected = 1.0 + 1.5 ** 2 + np.trace(sa) + np.trace(sb) - 2 * trace_root
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, abs=1e-9)


def test_prompt_plan_cycles_through_all_classes():
    plan = prompt_plan(50)
    assert plan[:24] == world.classes() and plan[24:48] == world.classes() and len(plan) == 50


def test_real_images_score_as_real_and_sit_at_the_frechet_floor(judge):
    """A perfect generator (fresh real images) is read correctly and is as far from the reference set as
    another real set is: the floor is what the sample size alone costs."""
    labels = prompt_plan(256)
    images = world.draw(20_000, labels)
    result = score(judge, images, labels)
    assert result["both"]["accuracy"] >= 0.98
    assert 0 < result["frechet_real_floor"] and result["frechet"] < 1.5 * result["frechet_real_floor"], result


def test_paired_changes_count_each_direction():
    asked = [f"{c} {s}" for c, s in prompt_plan(4)]
    reference = {"read": [asked[0], asked[1], "red star", asked[3]]}  # sample 2 wrong
    other = {"read": [asked[0], "blue circle", asked[2], "green square"]}  # 1 and 3 wrong, 2 right
    assert paired_changes(reference, other) == (2, 1)
    assert paired_changes(reference, reference) == (0, 0)


def test_shipped_teacher_follows_prompts_and_weight_noise_breaks_it(judge, tmp_path):
    """The trained model's images are read as the asked class; a damaged copy's are not (the metric can fail)."""
    settings = QualitySettings(samples=48, steps=20, guidance=5.0)
    good = measure_quality(judge, settings, model="asdm:toyworld")
    assert good["both"]["accuracy"] >= 0.75, good
    # 30% relative Gaussian noise on every UNet weight
    from asdm_export.models.loading import resolve_model

    pipe = resolve_model("asdm:toyworld").load_pipeline()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=gen) if p.numel() > 1 else 0)
    pipe.save_pretrained(str(tmp_path / "noisy"))
    bad = measure_quality(judge, settings, model=str(tmp_path / "noisy"))
    assert bad["both"]["accuracy"] < good["both"]["accuracy"] - 3 * good["both"]["se"], (good, bad)
    assert bad["frechet"] > good["frechet"]


def test_quality_on_a_bundle_matches_diffusers_and_writes_its_report(judge, tmp_path):
    from asdm_export.export import export_bundle

    bundle = tmp_path / "b"
    export_bundle("asdm:toyworld", bundle, batch=(1, 2, 2), latent=(16, 16, 16))
    result = run("quality", "--bundle", bundle, "-n", "12", "--steps", "8", "--out", tmp_path / "q")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert report["samples"] == 12 and (tmp_path / "q" / "samples.png").is_file()
    # the PyTorch program runtime on the same bundle reads the same way, and says which runtime it measured
    torch_run = run("quality", "--bundle", bundle, "-n", "12", "--steps", "8", "--backend", "torch", "--device",
                    "cpu", "--threads", torch.get_num_threads(), "--out", tmp_path / "qt")
    assert torch_run.exit_code == 0, torch_run.output
    on_torch = json.loads((tmp_path / "qt" / "quality.json").read_text())
    assert on_torch["backend"] == "torch" and on_torch["device"] == "cpu" and "provider" not in on_torch
    assert report["backend"] == "ort" and report["provider"] == "cpu"
    assert sum(a != b for a, b in zip(on_torch["read"], report["read"])) <= 1, (on_torch["read"], report["read"])
    # same prompts, seeds and schedule through diffusers: the fp32 graphs make the same images,
    # so the judge reads them the same way, sample by sample (one borderline image may tip)
    ref = measure_quality(judge, QualitySettings(samples=12, steps=8), model="asdm:toyworld",
                          threads=torch.get_num_threads())  # the suite's own setting: the option's path, no change
    assert len(report["read"]) == 12
    assert sum(a != b for a, b in zip(report["read"], ref["read"])) <= 1, (report["read"], ref["read"])
    # and the images themselves: the fp32 graphs against diffusers, same prompts, seeds and steps
    from asdm_export.toyworld.quality import generate_with_bundle, generate_with_diffusers

    def psnr(a, b):
        return 10 * np.log10(255 ** 2 / max(np.mean((a.astype(float) - b.astype(float)) ** 2), 1e-12))

    settings, labels = QualitySettings(samples=2, steps=8), prompt_plan(2)
    ours, _ = generate_with_bundle(bundle, settings, labels)
    theirs, _ = generate_with_diffusers("asdm:toyworld", settings, labels)
    assert psnr(ours, theirs) >= 40
    # --scheduler on both paths alike (one that draws noise in its steps, from each sample's generator)
    settings = QualitySettings(samples=2, steps=8, scheduler="euler-a")
    ours_a, _ = generate_with_bundle(bundle, settings, labels)
    theirs_a, _ = generate_with_diffusers("asdm:toyworld", settings, labels)
    assert psnr(ours_a, theirs_a) >= 40 and psnr(ours_a, ours) < 30, (psnr(ours_a, theirs_a), psnr(ours_a, ours))
    with pytest.raises(InputError, match="unknown scheduler 'euler-b'"):
        QualitySettings(scheduler="euler-b")


def test_quality_bad_usage_is_one_line(tmp_path):
    one_line_error(run("quality", "--bundle", tmp_path / "nope"), 2, "does not exist")
    result = run("quality", "--model", "asdm:toyworld", "--bundle", tmp_path)
    assert result.exit_code == 2 and "one of --model or --bundle" in result.output
    one_line_error(run("quality", "--model", "asdm:toyworld", "--judge", tmp_path), 2, "not a judge folder")
    # asdm:tiny makes 128x128 images: not the toy world's, so its score would mean nothing
    one_line_error(run("quality", "--model", "asdm:tiny", "-n", "2"), 2, "the judge reads the toy world's 64x64")
    (tmp_path / "q").mkdir()
    one_line_error(run("quality", "--model", "asdm:toyworld", "--out", tmp_path / "q"), 2, "already exists")
    # runtime options choose how a bundle runs: with --model they were ignored, the images made on the CPU
    for args in (["--backend", "torch", "--device", "cuda"], ["--provider", "cuda"], ["--backend", "trt"]):
        one_line_error(run("quality", "--model", "asdm:toyworld", "-n", "2", *args), 2, "choose how a --bundle runs")


def test_toyworld_images_writes_a_grid_and_refuses_a_folder(tmp_path):
    result = run("toyworld", "images", "--out", tmp_path / "g.png", "--count", "10")
    assert result.exit_code == 0, result.output
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "g.png"))
    assert grid.shape == (2 * 64, 8 * 64, 3)
    assert np.array_equal(grid[64:128, 64:128], world.sample(0, 9)[0])  # image 9: second row, second tile
    one_line_error(run("toyworld", "images", "--out", tmp_path), 2, "is a folder")


# ---- the recipe -----------------------------------------------------------------------------------
SMOKE = dict(images=64, vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4, warmup_steps=1,
             vae={"block_out_channels": (8, 16, 16), "layers_per_block": 1, "latent_channels": 4,
                  "norm_num_groups": 8, "sample_size": 64},
             unet={"sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
                   "block_out_channels": (16, 16, 16, 16), "cross_attention_dim": 64, "attention_head_dim": 2,
                   "norm_num_groups": 8})


def test_recipe_is_deterministic_and_writes_a_loadable_pipeline(tmp_path):
    from asdm_export.models.loading import resolve_model

    recipe = ToyRecipe(**SMOKE)
    for name in ("a", "b"):
        train_toyworld(tmp_path / name, recipe)
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors"):
        assert (tmp_path / "a" / part).read_bytes() == (tmp_path / "b" / part).read_bytes(), part
    recorded = json.loads((tmp_path / "a" / "recipe.json").read_text())
    assert ToyRecipe.from_json(recorded["recipe"]).unet_steps == 2
    pipe = resolve_model(str(tmp_path / "a")).load_pipeline()
    assert pipe.unet.dtype == torch.float32 and pipe.tokenizer.model_max_length == recipe.text_length
    assert pipe.vae.config.scaling_factor > 0


def test_train_cli_refuses_an_existing_folder(tmp_path):
    (tmp_path / "x").mkdir()
    one_line_error(run("toyworld", "train", "--out", tmp_path / "x"), 2, "already exists")


def test_scores_standard_errors_and_both_correct_follow_their_definitions():
    """A stand-in judge that misreads the colour of 20 of 100 images and every shape right: accuracy 0.8 with
    the binomial standard error sqrt(p (1 - p) / n) = 0.04; "both" needs colour and shape."""
    from asdm_export.toyworld.judge import hits, labels_to_index
    from asdm_export.toyworld.quality import QualitySettings, prompt_plan, score

    labels = prompt_plan(100)
    colour, shape = labels_to_index(labels)
    misread = colour.copy()
    misread[:20] = (misread[:20] + 1) % (colour.max() + 1)

    class Judge:
        def read(self, images):
            rng = np.random.default_rng(len(images))
            return {"colour": misread, "shape": shape, "features": rng.normal(size=(len(images), 4))}

    result = score(Judge(), np.zeros((100, 64, 64, 3), np.uint8), labels)
    assert result["colour"] == {"accuracy": 0.8, "se": pytest.approx(0.04, rel=1e-6)}
    assert result["shape"] == {"accuracy": 1.0, "se": 0.0} and result["both"]["accuracy"] == 0.8
    wrong_shape = hits({"colour": colour[:1], "shape": (shape[:1] + 1) % (shape.max() + 1)}, labels[:1])
    assert wrong_shape["colour"].tolist() == [True] and wrong_shape["both"].tolist() == [False]
    with pytest.raises(InputError, match="at least 2"):
        QualitySettings(samples=1)


def test_a_quality_report_written_over_its_judge_is_refused(tmp_path):
    """The judge is an input like the model: `--out JUDGE --overwrite` deleted it after loading it."""
    import shutil

    judge = shutil.copytree(JUDGE, tmp_path / "judge")
    before = sorted(p.name for p in judge.iterdir())
    one_line_error(run("quality", "--model", "asdm:toyworld", "--judge", judge, "--out", judge, "--overwrite"), 2,
                   "which writing it would delete")
    assert sorted(p.name for p in judge.iterdir()) == before


def test_quality_draws_at_the_judges_size_and_refuses_steps_the_scheduler_cannot_take(monkeypatch, tmp_path):
    """An engine folder built for 128 px made 128 px images by default, which the judge misread (both-correct
    0.5 where the same engines' bundle gave 1.0); `--steps 1000` with --model was an IndexError inside diffusers."""
    from asdm_export.runtime.pipeline import AsdmPipeline
    from asdm_export.toyworld.quality import generate_with_bundle

    asked = []

    class Folder:  # an engine folder whose own default size is 128 px
        info = {"sample_size": world.SIZE // 4, "vae_scale_factor": 4}

        def __call__(self, prompt, **kw):
            asked.append((kw["height"], kw["width"]))
            return [np.zeros((kw["height"] or 128, kw["width"] or 128, 3), np.uint8)]

    monkeypatch.setattr(AsdmPipeline, "from_bundle", classmethod(lambda cls, folder, **kw: Folder()))
    images, _ = generate_with_bundle(tmp_path, QualitySettings(samples=2, steps=2), prompt_plan(2))
    assert asked == [(world.SIZE, world.SIZE)] * 2 and images.shape[1:3] == (world.SIZE, world.SIZE)
    one_line_error(run("quality", "--model", "asdm:toyworld", "-n", "2", "--steps", "1000", "--out", tmp_path / "q"),
                   2, "DDIMScheduler at 1000 steps gives timestep 1000")
    assert not (tmp_path / "q").exists()
