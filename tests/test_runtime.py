"""The runtime: images from the exported graphs equal diffusers' own pipeline (and DeepCache's)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from asdm_export.cli import main
from asdm_export.errors import InputError
from asdm_export.export import export_bundle
from asdm_export.graphs.inheritance import InheritanceSpec
from asdm_export.graphs.schedule import Schedule
from asdm_export.runtime.pipeline import AsdmPipeline, Timings

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def sd_pipe(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(pipe, seed=0, steps=10, guidance=7.5, negative=None) -> np.ndarray:
    out = pipe(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    return (out * 255).round().astype(np.uint8)


def max_diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_ort_run_gives_diffusers_image(tiny_bundle, sd_pipe):
    expected = diffusers_image(sd_pipe, seed=3)
    timings = Timings()
    (image,) = AsdmPipeline.from_bundle(tiny_bundle)(PROMPT, steps=10, seed=3, timings=timings)
    assert image.shape == expected.shape == (128, 128, 3) and image.dtype == np.uint8
    assert max_diff(image, expected) <= 2
    assert expected.std() > 10  # a real image, not a flat one
    assert timings.images == 1 and len(timings.plan) == 10
    assert 0 < timings.unet_graphs <= timings.loop <= timings.total
    other = diffusers_image(sd_pipe, seed=4)
    assert max_diff(image, other) > 20  # the comparison can fail: another seed gives another image


def test_negative_prompt_and_no_guidance(tiny_bundle, sd_pipe):
    pipe = AsdmPipeline.from_bundle(tiny_bundle)
    (a,) = pipe(PROMPT, negative_prompt="a blue square", steps=6, seed=1)
    assert max_diff(a, diffusers_image(sd_pipe, seed=1, steps=6, negative="a blue square")) <= 2
    (b,) = pipe(PROMPT, steps=6, seed=1, guidance_scale=1.0)
    assert max_diff(b, diffusers_image(sd_pipe, seed=1, steps=6, guidance=1.0)) <= 2


def test_inheritance_run_gives_deepcache_image(deepcache_bundle, sd_pipe):
    from DeepCache import DeepCacheSDHelper

    bundle = deepcache_bundle  # block level, branch 0, uniform:3 over 10 steps
    helper = DeepCacheSDHelper(pipe=sd_pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    try:
        expected = diffusers_image(sd_pipe, seed=5)
    finally:
        helper.disable()
    timings = Timings()
    (image,) = AsdmPipeline.from_bundle(bundle)(PROMPT, seed=5, timings=timings)
    assert max_diff(image, expected) <= 2
    assert [r for _, r in timings.plan].count("inherit") == 6
    assert max_diff(image, diffusers_image(sd_pipe, seed=5)) > 2  # without DeepCache: another image


def test_torch_backend_is_the_reference(tiny_bundle, sd_pipe):
    (a,) = AsdmPipeline.from_bundle(tiny_bundle, backend="ort")(PROMPT, steps=4, seed=2)
    (b,) = AsdmPipeline.from_bundle(tiny_bundle, backend="torch")(PROMPT, steps=4, seed=2)
    assert max_diff(a, b) <= 2
    expected = diffusers_image(sd_pipe, seed=2, steps=4)  # not the project's loop: diffusers' own pipeline
    assert max_diff(a, expected) <= 2 and max_diff(b, expected) <= 2
    assert max_diff(a, diffusers_image(sd_pipe, seed=3, steps=4)) > 20


def test_run_cli_writes_one_png_per_prompt(tiny_bundle, tmp_path):
    from PIL import Image

    out = tmp_path / "img.png"
    r = CliRunner().invoke(main, ["run", "--engines", str(tiny_bundle), "-p", PROMPT, "-p", "a blue square",
                                  "--steps", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    for i in range(2):
        img = Image.open(tmp_path / f"img-{i}.png")
        assert img.size == (128, 128) and img.mode == "RGB"
    assert "UNet graphs" in r.output and "loop overhead" in r.output
    assert not list(tmp_path.glob(".*.tmp"))


def test_threads_reach_onnx_runtime_and_pytorch(tiny_bundle, tmp_path, monkeypatch):
    """run --threads N: ONNX Runtime's sessions get N intra-op threads and PyTorch's pool N; without it the
    libraries keep their defaults (ORT's 0, PyTorch's as it was)."""
    from asdm_export.runtime import runners

    seen = []
    original = runners.inference_session

    def record(path, options, *args, **kwargs):
        seen.append(options.intra_op_num_threads)
        return original(path, options, *args, **kwargs)

    monkeypatch.setattr(runners, "inference_session", record)
    before = torch.get_num_threads()
    try:
        for threads, ort_threads, torch_threads in ((None, 0, before), (before + 1, before + 1, before + 1)):
            seen.clear()
            args = ["--threads", str(threads)] if threads else []
            r = CliRunner().invoke(main, ["run", "--engines", str(tiny_bundle), "-p", PROMPT, "--steps", "2",
                                          "--out", str(tmp_path / "x.png"), *args])
            assert r.exit_code == 0, r.output
            assert seen and set(seen) == {ort_threads}, seen
            assert torch.get_num_threads() == torch_threads
    finally:
        torch.set_num_threads(before)


def test_first_use_setup_is_reported_apart_from_the_stages(tiny_bundle):
    """Sessions made (programs exported, graphs captured) on a graph's first use are not the graph's time: a
    first image's stages leave them out and a "first-use setup" row holds them. ONNX Runtime here, with 50 s of
    make-believe setup per session so that the sums are exact."""
    from asdm_export.runtime.backends import OrtBackend

    class SlowToOpen(OrtBackend):
        def session(self, graph):
            if graph not in self._sessions:
                self.setup_seconds += 50.0
            return super().session(graph)

    backend = SlowToOpen(tiny_bundle)
    pipe = AsdmPipeline(tiny_bundle, backend.manifest, backend)
    first, again = Timings(), Timings()
    pipe(PROMPT, steps=2, timings=first)
    assert 150.0 <= first.setup < 160.0  # three sessions: text encoder, UNet, VAE decoder
    stages = dict(first.rows())
    assert stages["first-use setup"] == first.setup
    assert all(0.0 <= stages[s] < 50.0 for s in ("text encoder", "UNet graphs", "loop overhead", "VAE decoder"))
    pipe(PROMPT, steps=2, timings=again)
    assert again.setup == 0.0 and "first-use setup" not in dict(again.rows())


@pytest.mark.parametrize("args,code,needle", [
    (["--height", "120"], 2, "multiples of 64"),
    (["--width", "1024"], 2, "outside the graphs' range"),
    (["--backend", "trt"], 2, "ONNX graphs, not TensorRT engines; build TensorRT engines from it with"),
    (["--width", "0"], 2, "width 0 is outside the graphs' range"),
    (["--height", "0"], 2, "height 0 is outside the graphs' range"),
])
def test_run_cli_errors(tiny_bundle, tmp_path, args, code, needle):
    r = CliRunner().invoke(main, ["run", "--engines", str(tiny_bundle), "-p", PROMPT, "--out",
                                  str(tmp_path / "x.png"), *args])
    assert r.exit_code == code, r.output
    assert r.stderr.startswith("error:") and needle in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_unet_only_bundle_cannot_run(tiny_dir, tmp_path):
    bundle = tmp_path / "unet-only"
    export_bundle(str(tiny_dir / "unet"), bundle)
    r = CliRunner().invoke(main, ["run", "--engines", str(bundle), "-p", PROMPT, "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "no text encoder" in r.stderr


def test_default_size_is_the_graphs_opt_size_when_they_do_not_take_the_native_one(tiny_dir, tmp_path):
    bundle = tmp_path / "narrow"
    export_bundle(str(tiny_dir), bundle, batch=(1, 2, 2), latent=(24, 24, 32))  # native latent 16: outside
    pipe = AsdmPipeline.from_bundle(bundle)
    assert pipe.default_size() == (24 * 8, 24 * 8)
    (image,) = pipe(PROMPT, steps=2)
    assert image.shape == (192, 192, 3)
    with pytest.raises(Exception, match="outside the graphs' range"):
        pipe(PROMPT, steps=2, height=128)


# --scheduler's names, and the diffusers scheduler a user of StableDiffusionPipeline would swap in for each (the
# reference; written out here, not read from the product's table)
SCHEDULERS = {"ddim": ("DDIMScheduler", {}), "pndm": ("PNDMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
              "euler-a": ("EulerAncestralDiscreteScheduler", {}), "dpm++2m": ("DPMSolverMultistepScheduler", {}),
              "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
              "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
              "lms": ("LMSDiscreteScheduler", {}), "heun": ("HeunDiscreteScheduler", {}),
              "unipc": ("UniPCMultistepScheduler", {}), "ddpm": ("DDPMScheduler", {})}
PARITY_STEPS = 10  # every scheduler's own branches for short runs are diffusers' too (DPM++'s lower-order end)


@pytest.fixture(scope="module")
def deepcache_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("parity") / "dc"
    export_bundle("asdm:tiny", out, inheritance=InheritanceSpec("block", branch=0),
                  schedule=Schedule.parse("uniform:3", PARITY_STEPS))
    return out


@pytest.fixture(scope="module")
def diffusers_latents(sd_pipe):
    """diffusers' final latents per (scheduler, cached): StableDiffusionPipeline with the scheduler swapped (and
    DeepCache's helper, interval 3, branch 0, when cached), seed 3; each computed once for the module."""
    import diffusers
    from DeepCache import DeepCacheSDHelper

    memo = {}

    def get(name: str, cached: bool) -> torch.Tensor:
        if (name, cached) not in memo:
            original = sd_pipe.scheduler
            cls, extra = SCHEDULERS[name]
            sd_pipe.scheduler = getattr(diffusers, cls).from_config({**original.config, **extra})
            helper = DeepCacheSDHelper(pipe=sd_pipe)
            helper.set_params(cache_interval=3, cache_branch_id=0)
            try:
                if cached:
                    helper.enable()
                memo[name, cached] = sd_pipe(PROMPT, num_inference_steps=PARITY_STEPS, guidance_scale=7.5,
                                             output_type="latent",
                                             generator=torch.Generator().manual_seed(3)).images.double()
            finally:
                if cached:
                    helper.disable()
                sd_pipe.scheduler = original
        return memo[name, cached]

    return get


def _final_latents(pipe: AsdmPipeline, seed: int) -> torch.Tensor:
    """The product's first image's final latents (what it hands the VAE)."""
    seen = []
    pipe.decode = lambda latents: seen.append(latents) or np.zeros((1, 8, 8, 3), np.uint8)
    pipe(PROMPT, steps=PARITY_STEPS, seed=seed)
    return seen[0].double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cached", [False, True], ids=["plain", "deepcache"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_first_image_equals_diffusers_for_every_scheduler(name, cached, tiny_bundle, deepcache_bundle,
                                                           diffusers_latents):
    """A fresh pipeline with the scheduler named (`run --scheduler`): its first image's final latents equal
    diffusers' StableDiffusionPipeline with that scheduler swapped in, as its users swap them (with DeepCache's
    helper, same interval and branch, for the cached bundle)."""
    from asdm_export.runtime.schedulers import scheduler_name

    expected = diffusers_latents(name, cached)
    pipe = AsdmPipeline.from_bundle(deepcache_bundle if cached else tiny_bundle, scheduler=name)
    assert scheduler_name(pipe.scheduler) == name
    ours = _final_latents(pipe, seed=3)
    rel = _rel(ours, expected)
    assert rel <= 1e-5, rel  # measured <= 2.5e-6 (AVX2 kernels too); a UNet sample rounded to fp16 gives 4e-5
    assert _rel(_final_latents(pipe, seed=4), expected) > 0.1  # another seed differs


@pytest.mark.parametrize("name", SCHEDULERS)
def test_deepcache_changes_every_schedulers_result(name, diffusers_latents):
    """The cached and the plain references differ, so the cached parity above cannot pass with a runtime that
    ignores the cache (or runs full graphs at every step)."""
    assert _rel(diffusers_latents(name, True), diffusers_latents(name, False)) > 1e-3


def test_every_scheduler_gives_its_own_result(diffusers_latents):
    """No two references agree within 10x the parity bound, so the parity above cannot pass with a runtime that
    runs one scheduler for another (or its own whatever the name). Closest: ddim and euler, 1.2e-3 (one ODE
    step in two parametrisations). DDPM's ancestral step is Euler ancestral's in another parametrisation: with
    the same generator they agree to 1.2e-6, so that pair is told apart by the scheduler's class only."""
    same = {("euler-a", "ddpm")}
    closest = min((_rel(diffusers_latents(a, False), diffusers_latents(b, False)), a, b)
                  for i, a in enumerate(SCHEDULERS) for b in list(SCHEDULERS)[i + 1:] if (a, b) not in same)
    assert closest[0] > 1e-4, closest
    assert all(_rel(diffusers_latents(a, False), diffusers_latents(b, False)) < 1e-5 for a, b in same)


def test_run_samples_with_the_scheduler_it_is_given(tiny_bundle, tmp_path):
    """`run --scheduler`: the Python API's image with that scheduler, not the bundle's own, and named in the
    table; a name it does not know, one line (the command line's and the API's)."""
    from PIL import Image

    r = CliRunner().invoke(main, ["run", "-e", str(tiny_bundle), "-p", PROMPT, "--steps", "4", "--scheduler",
                                  "dpm++2m", "-o", str(tmp_path / "a.png")])
    assert r.exit_code == 0, r.output
    assert "4 steps of dpm++2m on" in r.stdout
    image = np.asarray(Image.open(tmp_path / "a.png"))
    (expected,) = AsdmPipeline.from_bundle(tiny_bundle, scheduler="dpm++2m")(PROMPT, steps=4)
    (own,) = AsdmPipeline.from_bundle(tiny_bundle)(PROMPT, steps=4)
    assert np.array_equal(image, expected) and max_diff(image, own) > 10
    r = CliRunner().invoke(main, ["run", "-e", str(tiny_bundle), "-p", PROMPT, "--scheduler", "dpm++",
                                  "-o", str(tmp_path / "b.png")])
    assert r.exit_code == 2 and "'dpm++' is not one of 'ddim'" in r.output and len(r.output.strip().splitlines()) == 1
    with pytest.raises(InputError, match="unknown scheduler 'dpm'; choose one of ddim, ddpm"):
        AsdmPipeline.from_bundle(tiny_bundle, scheduler="dpm")
    assert not (tmp_path / "b.png").exists()


def test_a_scheduler_that_cannot_follow_the_schedule_is_refused_as_the_folder_opens(deepcache_bundle, tmp_path):
    """Heun calls the UNet twice per step; an explicit schedule names steps: `run` said so at the first image,
    and `triton-repo --scheduler heun` wrote a deployment that failed every request (helper-45). The folder, the
    server's repository and the deployment refuse it as they are opened or written."""
    import json
    import shutil

    from asdm_export.runtime.pipeline import AsdmPipeline
    from asdm_export.serve.repo import write_serving_repo, write_triton_repo

    folder = tmp_path / "explicit"
    shutil.copytree(deepcache_bundle, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["schedule"] = Schedule.parse("explicit:0,4,8", PARITY_STEPS).to_json()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    said = "HeunDiscreteScheduler calls the UNet 19 times for 10 steps; .* \\(--scheduler ddim, euler"
    for open_or_write in (lambda: AsdmPipeline.from_bundle(folder, scheduler="heun"),
                          lambda: write_serving_repo(folder, tmp_path / "serving", scheduler="heun"),
                          lambda: write_triton_repo(folder, tmp_path / "deploy", scheduler="heun")):
        with pytest.raises(InputError, match=said):
            open_or_write()
    assert not (tmp_path / "deploy").exists()
    assert AsdmPipeline.from_bundle(folder, scheduler="dpm++2m").scheduler.config.algorithm_type == "dpmsolver++"
    for name in (["ddim"], 3):  # the Python API's wrong types: the same one line
        with pytest.raises(InputError, match="unknown scheduler .*; choose one of ddim, ddpm"):
            AsdmPipeline.from_bundle(folder, scheduler=name)


def test_image_i_of_a_batch_is_a_single_run_with_seed_plus_i(tiny_bundle):
    pipe = AsdmPipeline.from_bundle(tiny_bundle)
    args = dict(steps=2, height=64, width=64)
    batch = pipe([PROMPT, "a blue square", PROMPT], seed=7, **args)
    singles = [pipe(prompt, seed=seed, **args)[0] for prompt, seed in ((PROMPT, 7), ("a blue square", 8), (PROMPT, 9))]
    for i, (a, b) in enumerate(zip(batch, singles)):
        assert np.array_equal(a, b), i
    assert max_diff(batch[0], batch[2]) > 20  # same prompt, seeds 7 and 9: another image


def test_a_loop_takes_only_the_batches_every_unet_graph_was_built_for():
    """Requests per loop (UNet batch 2B with guidance): a bundle's batch range, TensorRT engines' profiles, torch
    programs' built batches; a folder built for one image with guidance (UNet batch 2, the shipped specs) takes
    one request per loop, else two requests ran the UNet at a batch no engine holds."""
    from asdm_export.runtime.folders import loop_batch_limit

    def graph(name, batch_max=8, engines=()):
        return {"name": name, "component": "unet", "profile": {"batch": {"min": 1, "opt": 2, "max": batch_max}},
                "engines": [{"profile": {"sample": {"min": [lo, 4, 64, 64], "opt": [lo, 4, 64, 64],
                                                    "max": [hi, 4, 64, 64]}}} for lo, hi in engines]}

    bundle = {"kind": "bundle", "graphs": [graph("unet.full"), graph("unet.inherit", 5)]}
    assert loop_batch_limit(bundle) == 2  # the smaller graph: batch 4, not 6
    trt = {"kind": "engines", "backend": "trt", "graphs": [graph("unet.full", engines=[(2, 2)]),
                                                           graph("unet.inherit", engines=[(2, 2)])]}
    assert loop_batch_limit(trt) == 1  # static profiles at batch 2, the bundle's range notwithstanding
    trt["graphs"][0]["engines"][0]["profile"]["sample"]["max"][0] = 8
    trt["graphs"][1]["engines"].append({"profile": {"sample": {"min": [3, 4, 64, 64], "opt": [4, 4, 64, 64],
                                                               "max": [6, 4, 64, 64]}}})
    assert loop_batch_limit(trt) == 3  # unet.inherit runs 2 and 3-6: batches 2, 4, 6
    programs = [{"name": "unet.full", "inputs": {"sample": [b, 4, 8, 8]}} for b in (2, 4, 8)]
    torch_folder = {"kind": "engines", "backend": "torch", "graphs": [graph("unet.full")], "programs": programs}
    assert loop_batch_limit(torch_folder) == 2  # 2 and 4, not 6: batch 8 alone is of no use to a loop of 3
    assert loop_batch_limit({**torch_folder, "programs": programs[2:]}) == 1


def test_requests_batched_into_one_loop_equal_each_request_alone(tiny_bundle, deepcache_bundle):
    """The server's dynamic batching: requests sharing steps and size run as one loop (UNet batch 2B), each
    with its own seed, prompt, negative prompt and guidance scale, and give the images they give alone."""
    from asdm_export.errors import InputError
    from asdm_export.runtime.pipeline import ImageRequest

    for bundle in (tiny_bundle, deepcache_bundle):
        pipe = AsdmPipeline.from_bundle(bundle)
        assert pipe.max_batch == 2 and pipe.batches_requests  # UNet profile batch max 4, halved for guidance
        a = ImageRequest("a red circle", steps=6, guidance_scale=7.5, seed=3)
        b = ImageRequest("a blue square", "a red circle", steps=6, guidance_scale=3.0, seed=11)
        timings = Timings()
        together = pipe.generate([a, b], timings)
        assert timings.images == 2 and len(timings.plan) == 6  # one loop of 6 steps for both
        alone = [pipe.generate([r])[0] for r in (a, b)]
        for got, ref in zip(together, alone):
            assert max_diff(got, ref) <= 1
        assert max_diff(together[0], together[1]) > 10  # two different images, not one image twice
    with pytest.raises(InputError, match="share steps"):
        pipe.generate([a, ImageRequest("x", steps=7)])
    with pytest.raises(InputError, match="steps must be from 1 to 1000"):
        pipe.generate([ImageRequest("x", steps=0)])
    # more requests than one loop takes run in turn, still each its own image
    three = pipe.generate([a, b, ImageRequest("a green triangle", steps=6, seed=5)])
    assert max_diff(three[0], together[0]) <= 1 and max_diff(three[1], together[1]) <= 1


@pytest.mark.parametrize("name, extra", [("LCMScheduler", {}), ("EulerAncestralDiscreteScheduler", {}),
                                         ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"})])
def test_samplers_that_draw_noise_batch_with_one_generator_per_request(tiny_bundle, name, extra):
    """A sampler's own per-step noise comes from each request's generator inside one batched loop, so a batched
    image is the image alone (a loop fed no generator draws from torch's global RNG: another image)."""
    import diffusers

    from asdm_export.runtime.pipeline import ImageRequest

    pipe = AsdmPipeline.from_bundle(tiny_bundle)
    pipe.scheduler = getattr(diffusers, name).from_config({**pipe.scheduler.config, **extra})
    calls = []
    run = pipe.backend.run
    pipe.backend.run = lambda graph, feeds: ("sample" in feeds and calls.append(len(feeds["sample"]))) or \
        run(graph, feeds)
    a = ImageRequest("a red circle", steps=4, seed=1)
    b = ImageRequest("a blue square", steps=4, seed=2)
    together = pipe.generate([a, b])
    assert calls == [4] * 4  # one loop: 4 steps at batch 2 x 2 (guidance)
    torch.manual_seed(123)  # the global RNG moves on: a batched loop that drew from it would change
    alone = [pipe.generate([r])[0] for r in (a, b)]
    for got, ref in zip(together, alone):
        assert max_diff(got, ref) <= 1
    assert max_diff(together[0], together[1]) > 10


def test_requests_with_and_without_guidance_never_share_a_loop(tiny_bundle):
    """A loop runs guidance for all its images or for none: a request without (scale 1) next to one with must
    not be batched with it, or its image changes."""
    from asdm_export.runtime.pipeline import ImageRequest

    pipe = AsdmPipeline.from_bundle(tiny_bundle)
    off, on = (pipe.resolve(ImageRequest(PROMPT, steps=2, guidance_scale=g, seed=1)) for g in (1.0, 7.5))
    assert pipe.batch_key(off) != pipe.batch_key(on)
    with pytest.raises(InputError, match="share steps, height, width and guidance on/off"):
        pipe.generate([off, on])


def test_resolve_refuses_what_the_cli_refuses_for_it(tiny_bundle):
    """`serve` hands requests to resolve without click's checks: a guidance scale outside the CLI's 0 to 100
    (1e38 gave a black image, HTTP 200) is one line there; the graphs' largest size is taken, the next multiple
    past it is not."""
    from asdm_export.runtime.pipeline import ImageRequest

    pipe = AsdmPipeline.from_bundle(tiny_bundle)
    for scale in (float("inf"), float("nan"), 1e38, 100.5, -5.0, "x", None):
        with pytest.raises(InputError, match="guidance scale must be a number from 0 to 100, not"):
            pipe.resolve(ImageRequest(PROMPT, steps=2, guidance_scale=scale))
    assert pipe.resolve(ImageRequest(PROMPT, steps=2, guidance_scale=np.float32(100))).guidance_scale == 100
    top = pipe.manifest["graphs"][0]["profile"]["height"]["max"] * pipe.info["vae_scale_factor"]
    assert pipe.resolve(ImageRequest(PROMPT, steps=2, height=top, width=top)).height == top
    with pytest.raises(InputError, match="outside the graphs' range"):
        pipe.resolve(ImageRequest(PROMPT, steps=2, height=top + 64, width=top))
    # the Python API's own values: 2.7 steps ran as 2, the others were a TypeError or torch's RuntimeError
    for request, needle in ((ImageRequest(PROMPT, steps=2.7), "steps must be a whole number, not 2.7"),
                            (ImageRequest(None, steps=2), "a prompt is text, not NoneType"),
                            (ImageRequest(PROMPT, negative_prompt=b"x", steps=2), "a prompt is text, not bytes"),
                            # torch's CPU generator keeps 32 bits: 2**32 drew seed 0's noise, -1 seed 2**32 - 1's
                            (ImageRequest(PROMPT, steps=2, seed=2**32), "seed must be a whole number from 0 to"),
                            (ImageRequest(PROMPT, steps=2, seed=-1), "seed must be a whole number from 0 to"),
                            (ImageRequest(PROMPT, steps=2, seed=1.5), "seed must be a whole number")):
        with pytest.raises(InputError, match=re.escape(needle)):
            pipe.resolve(request)
    assert pipe.resolve(ImageRequest(PROMPT, steps=2.0, seed=np.int64(3))).steps == 2  # whole numbers of any type
    assert pipe.resolve(ImageRequest(PROMPT, steps=2, seed=2**32 - 1)).seed == 2**32 - 1
    # the CLI's largest seed with several prompts: image i takes seed + i, around past 2**32 - 1 to 0 (the second
    # image was refused, naming a seed the user never gave)
    from asdm_export.runtime.pipeline import image_seed

    assert [image_seed(2**32 - 2, i) for i in range(4)] == [2**32 - 2, 2**32 - 1, 0, 1]
    assert image_seed(np.int64(5), 1) == 6 and image_seed(2**32, 0) == 2**32  # out of range: resolve refuses it


def test_loop_overhead_is_the_loops_share_outside_the_graphs():
    assert Timings(loop=10.0, unet_graphs=8.0, total=20.0).loop_overhead == pytest.approx(0.2)
    assert Timings().loop_overhead == 0.0


@pytest.mark.parametrize("native,rng,expected", [
    (16, {"min": 24, "opt": 32, "max": 40}, 32),                  # native below the range: the graphs' opt
    (30, {"min": 24, "opt": 36, "max": 48, "multiple": 12}, 36),  # inside it but off the multiple: opt
    (30, {"min": 12, "opt": 24, "max": 48, "multiple": 12}, 24),  # ... the opt, not the min, where they differ
    (48, {"min": 24, "opt": 32, "max": 48, "multiple": 12}, 48),  # on the multiple at the top: native
])
def test_default_size_is_native_where_the_graphs_take_it_else_their_opt(native, rng, expected):
    from asdm_export.runtime.backends import Backend

    pipe = AsdmPipeline.__new__(AsdmPipeline)  # no files: only the manifest's profile and the pipeline's sizes
    pipe.info = {"vae_scale_factor": 8, "sample_size": native}
    pipe.manifest = {"graphs": [{"name": "unet", "component": "unet", "profile": {"height": rng}}]}
    pipe.backend = Backend()
    assert pipe.default_size() == (expected * 8, expected * 8)
    pipe._check_size(*pipe.default_size())  # and what it picks is a size the graphs take


def test_decode_rounds_as_diffusers_and_shows_nan_as_black():
    """diffusers' numpy_to_pil rounds (half of the pixels of a smooth image would otherwise be 1/255 off, which
    the end-to-end checks' +-2 cannot see); NaN, from a broken engine, is black."""
    from asdm_export.runtime.backends import Backend

    values = torch.tensor([-1.0, -0.5, 0.0, 0.30, 0.7, 1.0, 3.0, float("nan")])

    class Vae(Backend):
        def run(self, graph, feeds):
            return {"images": values.view(1, 1, 1, -1).expand(1, 3, 1, -1)}

    pipe = AsdmPipeline.__new__(AsdmPipeline)
    pipe.backend = Vae()
    got = pipe.decode(torch.zeros(1, 4, 1, 1))[0, 0, :, 0]
    want = [0, 64, 128, 166, 217, 255, 255, 0]  # ((v / 2 + 0.5) * 255).round(), clamped
    assert got.tolist() == want and got.dtype == np.uint8


def test_a_sampler_that_draws_noise_without_a_generator_runs_one_image_per_loop():
    """Its noise cannot be given per image: batched, image i would not be what request i gives alone."""
    def plain_step(self, noise, t, latents, return_dict=False):
        return (latents,)

    def seeded_step(self, noise, t, latents, generator=None, return_dict=False):
        return (latents,)

    def pipe_with(name, takes_generator):
        pipe = AsdmPipeline.__new__(AsdmPipeline)
        pipe.scheduler = type(name, (), {"step": seeded_step if takes_generator else plain_step})()
        return pipe

    assert not pipe_with("DPMSolverSDEScheduler", False).batches_requests
    assert not pipe_with("KDPM2AncestralDiscreteScheduler", False).batches_requests
    assert pipe_with("DPMSolverSDEScheduler", True).batches_requests  # one generator per image
    assert pipe_with("DDIMScheduler", False).batches_requests


def test_an_engine_folder_of_another_backend_is_refused_before_anything_opens():
    """`serve --backend ort` on a folder of PyTorch programs was found out only inside the Triton server (the ORT
    backend's own check); every backend is now checked where the choice is made, each message saying what the
    folder can do."""
    from pathlib import Path

    from asdm_export.errors import InputError
    from asdm_export.runtime.folders import check_backend_choice

    programs = {"kind": "engines", "backend": "torch"}
    with pytest.raises(InputError, match=r"holds PyTorch programs, not ONNX Runtime graphs; run it with --backend "
                                         r"torch, or run its bundle with --backend ort"):
        check_backend_choice(Path("EP"), programs, "ort")
    with pytest.raises(InputError, match=r"holds ONNX Runtime graphs, not PyTorch programs; run it with --backend "
                                         r"ort, or run its bundle with --backend torch"):
        check_backend_choice(Path("EO"), {"kind": "engines", "backend": "ort"}, "torch")
    assert check_backend_choice(Path("B"), {"kind": "bundle"}, "torch") == "torch"  # a bundle runs on either
    assert check_backend_choice(Path("EP"), programs, None) == "torch"  # a folder's own backend by default
