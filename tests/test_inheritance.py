"""Feature inheritance: full / inherit graphs at every level, schedules, switching, and DeepCache as oracle."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asdm_export.errors import InputError
from asdm_export.export import export_bundle
from asdm_export.graphs import UNetForExport
from asdm_export.graphs.inheritance import InheritanceSpec
from asdm_export.graphs.schedule import Schedule, quadratic_full_steps
from asdm_export.models.loading import resolve_model
from asdm_export.runtime.backends import OrtBackend, TorchBackend
from asdm_export.runtime.denoise import LoopStats, denoise

LEVELS = {
    "block0": InheritanceSpec("block", branch=0),
    "block1": InheritanceSpec("block", branch=1),
    "layer": InheritanceSpec("layer", points=("down_blocks.1.attentions.0", "up_blocks.1.resnets.1")),
    "unit": InheritanceSpec("unit", points=("*.attn2",)),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("inherit")
    sched = Schedule.parse("uniform:3", 10)
    return {name: (root / name, export_bundle("asdm:tiny", root / name, inheritance=spec, schedule=sched))
            for name, spec in LEVELS.items()}


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def feeds(batch=2, h=16, w=16, t=500.0, seed=0):
    rng = np.random.default_rng(seed)
    return {"sample": rng.normal(size=(batch, 4, h, w)).astype(np.float32),
            "timestep": np.full((batch,), t, np.float32),
            "encoder_hidden_states": rng.normal(size=(batch, 77, 32)).astype(np.float32)}


@pytest.mark.parametrize("level", list(LEVELS))
def test_full_graph_predicts_what_the_unsplit_unet_predicts(bundles, tiny_dir, level):
    bundle, manifest = bundles[level]
    plain = UNetForExport(resolve_model(str(tiny_dir)).load_unet())
    f = feeds(h=16, w=24)
    with torch.inference_mode():
        ref = plain(*(torch.from_numpy(v) for v in f.values())).numpy()
    out = OrtBackend(bundle).run("unet.full", f)
    assert rel_l2(out["noise_pred"].numpy(), ref) <= 1e-5
    assert any(k.startswith("cache.") for k in out)


@pytest.mark.parametrize("level", list(LEVELS))
def test_inherit_graph_matches_the_split_reference_and_is_smaller(bundles, level):
    bundle, manifest = bundles[level]
    ort, ref = OrtBackend(bundle), TorchBackend.from_bundle(bundle)
    f = feeds(h=8, w=16, seed=1)
    full = {k: v.numpy() for k, v in ort.run("unet.full", f).items()}
    cache = {k: v for k, v in full.items() if k.startswith("cache.")}
    # with the features cached from the same inputs, inheriting changes nothing
    again = ort.run("unet.inherit", {**f, **cache})
    assert rel_l2(again["noise_pred"], full["noise_pred"]) <= 1e-5
    # with features from another step (other inputs), ORT's inherit graph equals PyTorch's split module
    stale = {k: v + np.random.default_rng(2).normal(size=v.shape).astype(np.float32) for k, v in cache.items()}
    a = ort.run("unet.inherit", {**f, **stale})["noise_pred"]
    b = ref.run("unet.inherit", {k: torch.from_numpy(v) for k, v in {**f, **stale}.items()})["noise_pred"]
    assert rel_l2(a, b) <= 1e-5
    assert rel_l2(a, full["noise_pred"]) > 1e-3  # the cached input really is used
    graphs = {g["name"]: g for g in manifest["graphs"]}
    assert graphs["unet.inherit"]["nodes"] < graphs["unet.full"]["nodes"]
    assert graphs["unet.inherit"]["macs_at_opt"] < graphs["unet.full"]["macs_at_opt"]


def test_block_branch0_skips_almost_everything(bundles):
    graphs = {g["name"]: g for g in bundles["block0"][1]["graphs"]}
    ratio = graphs["unet.inherit"]["macs_at_opt"] / graphs["unet.full"]["macs_at_opt"]
    assert ratio < 0.2, ratio  # conv_in, the last up layer and conv_out only


@pytest.mark.parametrize("branch", [0, 1])
def test_graphs_reproduce_deepcache(bundles, tiny_dir, branch):
    """Oracle: diffusers + DeepCache (DDIM, 10 steps, CFG, uniform N=3) against our graphs on ORT."""
    from DeepCache import DeepCacheSDHelper
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir))
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a red circle", "cpu", 1, True)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=branch)
    helper.enable()
    expected = pipe("a red circle", num_inference_steps=10, guidance_scale=7.5, latents=latents.clone(),
                    output_type="latent").images
    helper.disable()
    plain = pipe("a red circle", num_inference_steps=10, guidance_scale=7.5, latents=latents.clone(),
                 output_type="latent").images

    bundle, manifest = bundles[f"block{branch}"]
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    stats = LoopStats()
    ours = denoise(OrtBackend(bundle), manifest, Schedule.from_json(manifest["schedule"]), scheduler,
                   latents.clone() * scheduler.init_noise_sigma, cond, uncond, 7.5, stats)
    assert rel_l2(ours, expected) <= 1e-5  # measured 1.3e-6; a sample rounded to fp16 each step: 5e-5
    assert rel_l2(plain, expected) > 1e-3  # inheritance changes the result: the oracle can tell
    assert [r for _, r in stats.plan] == ["full", "inherit", "inherit"] * 3 + ["full"]


def test_a_student_without_a_mid_block_has_no_branch_there(tiny_dir):
    """bk-small drops the mid block: its deepest branch (DeepCache's id 10) does not exist, rather than naming
    a module the UNet lacks."""
    from asdm_export.assembly import build_student
    from asdm_export.graphs.inheritance import block_branches

    student = build_student(resolve_model(str(tiny_dir)).load_unet().eval(), "bk-small", experts=1)[0]
    assert student.mid_block is None
    branches = block_branches(student)
    assert sorted(branches) == [0, 1, 3, 4, 6, 7, 9] and "mid_block" not in branches.values()


@pytest.mark.parametrize("plan,branches", [(None, list(range(12))), ("bk-base", [0, 1, 3, 4, 6, 7, 9, 10])])
def test_every_branch_id_caches_where_deepcache_does(tiny_dir, plan, branches):
    """A branch id names the place DeepCache's ``cache_branch_id`` names, in the teacher and in a pruned
    student (bk students keep two layers per up block, so ids 2, 5, 8 and 11 are not theirs): one full step and
    one inherit step of our split modules against ``DeepCacheSDHelper`` on the same UNet, every branch."""
    import copy
    import types

    from DeepCache import DeepCacheSDHelper

    from asdm_export.assembly import build_student
    from asdm_export.graphs.graphs import UNetFull, UNetInherit
    from asdm_export.graphs.inheritance import block_branches, install_points, resolve_points

    unet = resolve_model(str(tiny_dir)).load_unet().eval()
    if plan is not None:
        unet = build_student(unet, plan, experts=1)[0].eval()
    assert sorted(block_branches(unet)) == branches
    g = torch.Generator().manual_seed(0)
    x1, x2, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g), torch.randn(
        2, 77, 32, generator=g)
    t = torch.tensor([900.0, 600.0])
    with torch.no_grad():
        plain = unet(x2, t[1], text, return_dict=False)[0]
    for branch in branches:
        theirs = copy.deepcopy(unet)  # DeepCache patches the UNet's forward
        pipe = types.SimpleNamespace(unet=theirs, scheduler=types.SimpleNamespace(timesteps=t))
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=2, cache_branch_id=branch)
        helper.enable()
        ours = copy.deepcopy(unet)
        points = resolve_points(ours, InheritanceSpec("block", branch=branch))
        hooks = install_points(ours, points)
        with torch.no_grad():
            theirs(x1, t[0], text, return_dict=False)
            expected = theirs(x2, t[1], text, return_dict=False)[0]
            _, *cache = UNetFull(ours, hooks, points)(x1, t[0].expand(2), text)
            got = UNetInherit(ours, hooks, points)(x2, t[1].expand(2), text, *cache)
        assert rel_l2(got, expected) <= 1e-6, (branch, points)
        assert rel_l2(expected, plain) > 1e-3, branch  # the cached feature is used: the oracle can tell


def _deepcache_quad_center():
    """DeepCache's own ``sample_from_quad_center``, read from the installed package's source (its module
    does not import with current diffusers, so the function is taken out with ast)."""
    import importlib.util

    spec = importlib.util.find_spec("DeepCache")
    src = (Path(spec.origin).parent / "sd" / "pipeline_stable_diffusion.py").read_text()
    fn = next(n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef) and n.name == "sample_from_quad_center")
    scope = {"np": np}
    exec(compile(ast.Module([fn], []), "deepcache", "exec"), scope)
    return scope["sample_from_quad_center"]


@pytest.mark.parametrize("steps,n,center,power", [
    (50, 10, 15, 1.4), (20, 7, 6, 1.4), (50, 17, 20, 1.2), (25, 5, 0, 1.4),
    (27, 9, 0, 2.0)])  # centre 0: real arithmetic, whose rounding near integers differs from complex
def test_quadratic_schedule_is_deepcaches(steps, n, center, power):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DeepCache's arithmetic goes through complex numbers
        expected, _ = _deepcache_quad_center()(steps, n, center, power)
    assert quadratic_full_steps(steps, n, center, power) == sorted(expected)


def _deepcache_full_steps(steps: int, interval: int, center: int, power: float) -> list[int]:
    """The full steps DeepCache's StableDiffusionPipeline runs with ``uniform=False``: its own count of slow steps
    (steps // interval, one more for a remainder) placed by its sampler."""
    import warnings

    n_slow = steps // interval + (1 if steps % interval else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sorted(_deepcache_quad_center()(steps, n_slow, center, power)[0])


@pytest.mark.parametrize("text,steps,center,power", [
    ("quadratic:3", 50, 50 // 3, 1.4),  # defaults: center steps // 3, power 1.4
    ("quadratic:5:10", 50, 10, 1.4),
    ("quadratic:4:5:1.2", 20, 5, 1.2),
    ("quadratic:3:0", 25, 0, 1.4),
    ("quadratic:2:8:1.6", 30, 8, 1.6),
    ("quadratic:3:3", 12, 3, 1.4),
])
def test_quadratic_schedule_full_steps_are_deepcaches(text, steps, center, power):
    interval = int(text.split(":")[1])
    expected = _deepcache_full_steps(steps, interval, center, power)
    sched = Schedule.parse(text, steps)
    assert sched.full_steps() == expected
    assert len(expected) == -(-steps // interval)  # as many full steps as uniform:N, placed differently
    assert expected != Schedule.parse(f"uniform:{interval}", steps).full_steps()
    assert [i for i, (_, r) in enumerate(sched.plan()) if r == "full"] == expected


def test_quadratic_schedule_that_cannot_be_placed_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="Cannot find suitable pow"):
        _deepcache_full_steps(10, 2, 5, 1.4)  # DeepCache cannot either
    with pytest.raises(InputError, match="cannot place 5 full steps among 10 around step 5"):
        Schedule(10, "quadratic", interval=2, center=5).full_steps()
    with pytest.raises(InputError, match="cannot place"):
        Schedule.parse("quadratic:2:5", 10)  # refused when parsed, before an export traces anything
    from click.testing import CliRunner

    from asdm_export.cli import main

    r = CliRunner().invoke(main, ["export", "--out", str(tmp_path / "b"), "--level", "block", "--branch", "0",
                                  "--schedule", "quadratic:2:5", "--steps", "10"])
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "cannot place" in r.stderr
    assert not (tmp_path / "b").exists()
    # values a mode does not take, and a centre that is no step, were accepted and ignored or extrapolated
    for text, needle in (("full:3", "full takes no values"), ("uniform:3:4", "uniform takes 1 value after"),
                         ("quadratic:3:10:1.4:2", "quadratic takes 3 values"),
                         ("quadratic:5:-3", "one of 0..49"), ("quadratic:5:50", "one of 0..49"),
                         ("quadratic:3:5:1e300", "at most 10")):  # the power: placing it never ended
        with pytest.raises(InputError, match=needle):
            Schedule.parse(text, 50)
    # a bundle's schedule run at fewer steps than its centre: refused as when parsed, not extrapolated
    with pytest.raises(InputError, match="around step 15; run with more than 15 steps"):
        Schedule.parse("quadratic:3:15", 20).with_steps(10)
    assert Schedule.parse("quadratic:3:15", 20).with_steps(16).steps == 16


def test_schedules_and_switching():
    assert Schedule.parse("uniform:3", 10).full_steps() == [0, 3, 6, 9]
    assert Schedule.parse("explicit:0,4,5", 10).full_steps() == [0, 4, 5]
    assert Schedule.parse("full", 4).full_steps() == [0, 1, 2, 3]
    s = Schedule.parse("uniform:3", 10, "unet:0-4,student:5-9", ("unet", "student"))
    assert s.plan() == [("unet", r) for r in ("full", "inherit", "inherit", "full", "inherit")] + \
                      [("student", r) for r in ("full", "inherit", "inherit", "full", "inherit")]
    assert Schedule.from_json(json.loads(json.dumps(s.to_json()))) == s
    assert Schedule.parse("uniform:3", 10).with_steps(20).full_steps() == list(range(0, 20, 3))
    # the cache starts empty: step 0 and every UNet segment's first step run in full, whatever the list says
    assert Schedule.parse("explicit:3,7", 10).full_steps() == [0, 3, 7]
    s = Schedule.parse("explicit:0,3", 10, "unet:0-4,twin:5-9", ("unet", "twin"))
    assert s.full_steps() == [0, 3, 5] and s.plan()[5] == ("twin", "full")
    # what the runtime reads back is what export wrote: the power too (1.2 places other steps than 1.4)
    q = Schedule.parse("quadratic:3:10:1.2", 50)
    assert Schedule.from_json(json.loads(json.dumps(q.to_json()))).full_steps() == q.to_json()["full_steps"]
    assert q.full_steps() != Schedule.parse("quadratic:3:10", 50).full_steps()
    # interval 1 is every step, quadratic or not; the last step may be named
    assert Schedule.parse("quadratic:1", 10).full_steps() == list(range(10))
    assert Schedule.parse("explicit:0,9", 10).full_steps() == [0, 9]


@pytest.mark.parametrize("text,switch,match", [
    ("sometimes:3", None, "unknown schedule mode"),
    ("uniform:x", None, "bad schedule"),
    ("explicit:0,12", None, "must lie in"),
    ("uniform:3", "unet:0-4", "cover steps"),
    ("uniform:3", "unet:0-4,ghost:5-9", "ghost"),
    ("explicit:0,10", None, "must lie in"),  # one past the last step
    ("uniform:3", "unet:0-5,unet:3-9", "exactly once"),  # overlapping segments
    ("explicit:", None, "at least one full step"),
    ("quadratic:3:5:1", None, "power must be above 1 and at most 10"),
])
def test_bad_schedules_are_clear_errors(text, switch, match):
    with pytest.raises(InputError, match=match):
        Schedule.parse(text, 10, switch, ("unet",))


def test_bad_inheritance_specs(tiny_dir, tmp_path):
    with pytest.raises(InputError, match="--branch"):
        InheritanceSpec("block")
    with pytest.raises(InputError, match="--points"):
        InheritanceSpec("layer")
    # options the level does not read are refused, not dropped
    for spec, match in (({"branch": 1}, "--branch is for block-level"), ({"points": ("*.attn2",)}, "--points is for"),
                        ({"reuse": "residual"}, "--reuse needs an inheritance level"),
                        ({"level": "block", "branch": 1, "points": ("*.attn2",)}, "block level takes --branch"),
                        ({"level": "unit", "branch": 1, "points": ("*.attn2",)}, "--branch is for block-level")):
        with pytest.raises(InputError, match=match):
            InheritanceSpec(**spec)
    with pytest.raises(InputError, match="has branches 0, 1, 2, 3,"):
        export_bundle("asdm:tiny", tmp_path / "b", inheritance=InheritanceSpec("block", branch=99),
                      schedule=Schedule.parse("uniform:3", 10))
    with pytest.raises(InputError, match="matches no unit-level point"):
        export_bundle("asdm:tiny", tmp_path / "b", inheritance=InheritanceSpec("unit", points=("*.attn9",)),
                      schedule=Schedule.parse("uniform:3", 10))
    with pytest.raises(InputError, match="needs an inheritance level"):
        export_bundle("asdm:tiny", tmp_path / "b", schedule=Schedule.parse("uniform:3", 10))
    assert not (tmp_path / "b").exists()


def test_an_export_that_names_no_schedule_runs_its_inherit_graph(tmp_path):
    """The Python API takes the CLI's default schedule: with an inheritance level it was `full`, a bundle whose
    inherit graph no step ran."""
    manifest = export_bundle("asdm:tiny", tmp_path / "b", inheritance=InheritanceSpec("block", branch=0),
                             unet_only=True, batch=(1, 1, 1))
    assert {k: manifest["schedule"][k] for k in ("mode", "interval", "steps")} == {"mode": "uniform", "interval": 3,
                                                                                  "steps": 50}
    assert export_bundle("asdm:tiny", tmp_path / "p", unet_only=True, batch=(1, 1, 1))["schedule"]["mode"] == "full"


class _RoutedBackend(OrtBackend):
    """The oracle of switching: one UNet's graph names, served by ``second``'s graphs from call ``switch_at`` on."""

    def __init__(self, bundle, switch_at: int, second: str):
        super().__init__(bundle)
        self.calls, self.switch_at, self.second = 0, switch_at, second

    def run(self, graph, feeds):
        if graph.startswith("unet."):
            if self.calls >= self.switch_at:
                graph = graph.replace("unet.", f"{self.second}.", 1)
            self.calls += 1
        return super().run(graph, feeds)


def test_multi_unet_switching_follows_the_schedule(tmp_path, tiny_dir):
    """Two different UNets (the twin: the model's UNet with perturbed weights): switching at step 5 equals the
    main UNet for steps 0-4 and the twin for 5-9, each with its own cache (refreshed at 5), and differs from
    either UNet alone."""
    from diffusers import UNet2DConditionModel

    twin_dir = tmp_path / "twin"
    twin = UNet2DConditionModel.from_pretrained(str(tiny_dir / "unet"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.2 * p.std().nan_to_num() * torch.randn(p.shape, generator=gen))
    twin.save_pretrained(str(twin_dir))
    steps = Schedule.parse("uniform:3", 10, "unet:0-4,twin:5-9", ("unet", "twin"))
    bundle = tmp_path / "two"
    manifest = export_bundle("asdm:tiny", bundle, inheritance=InheritanceSpec("block", branch=1), schedule=steps,
                             unets={"twin": str(twin_dir)}, latent=(16, 16, 16), batch=(2, 2, 2))
    assert set(manifest["unets"]) == {"unet", "twin"}
    assert {g["name"] for g in manifest["graphs"]} == {"unet.full", "unet.inherit", "twin.full", "twin.inherit",
                                                       "text_encoder", "vae_decoder"}
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_pretrained(str(tiny_dir), subfolder="scheduler")
    rng = torch.Generator().manual_seed(3)
    lat, cond, uncond = (torch.randn(s, generator=rng) for s in [(1, 4, 16, 16), (1, 77, 32), (1, 77, 32)])
    backend, stats = OrtBackend(bundle), LoopStats()
    a = denoise(backend, manifest, steps, sched, lat, cond, uncond, 5.0, stats)
    assert [u for u, _ in stats.plan] == ["unet"] * 5 + ["twin"] * 5
    assert [i for i, (_, r) in enumerate(stats.plan) if r == "full"] == [0, 3, 5, 8]
    one = Schedule.parse("explicit:0,3,5,8", 10)
    single = {**manifest, "unets": {"unet": manifest["unets"]["unet"]}}
    expected = denoise(_RoutedBackend(bundle, 5, "twin"), single, one, sched, lat, cond, uncond, 5.0)
    assert rel_l2(a, expected) <= 1e-6
    main_only = denoise(backend, single, one, sched, lat, cond, uncond, 5.0)
    twin_only = denoise(_RoutedBackend(bundle, 0, "twin"), single, one, sched, lat, cond, uncond, 5.0)
    assert rel_l2(a, main_only) > 1e-3 and rel_l2(a, twin_only) > 1e-3  # a wrong UNet would show


def test_export_cli_with_inheritance(tmp_path):
    from click.testing import CliRunner

    from asdm_export.cli import main

    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["export", "--out", str(out), "--level", "block", "--branch", "2",
                                  "--schedule", "quadratic:3:3", "--steps", "12", "--batch", "1:2:2"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["schedule"]["mode"] == "quadratic" and m["schedule"]["full_steps"][0] == 0
    assert m["schedule"]["full_steps"] == _deepcache_full_steps(12, 3, 3, 1.4) == [0, 3, 4, 8]
    assert m["unets"]["unet"]["points"] == ["up_blocks.2"]
    r = CliRunner().invoke(main, ["export", "--out", str(tmp_path / "c"), "--level", "block", "--branch", "40"])
    assert r.exit_code == 2 and r.stderr.startswith("error:") and "branches 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11 (see" in r.stderr
    r = CliRunner().invoke(main, ["points", "--level", "block"])
    assert r.exit_code == 0 and "branch  0" in r.output and "branch 11" in r.output


def test_explicit_and_switching_schedules_do_not_stretch(tiny_dir):
    """A uniform schedule takes another step count; explicit steps and UNet switching name steps, so another
    count (asked for, or made by a scheduler that calls the UNet more often than once a step) is refused."""
    from diffusers import DDIMScheduler, PNDMScheduler

    from asdm_export.runtime.denoise import call_plan

    explicit = Schedule.parse("explicit:0,4,7", 10)
    switching = Schedule.parse("uniform:3", 10, "unet:0-4,twin:5-9", ("unet", "twin"))
    for sched in (explicit, switching):
        assert sched.with_steps(10) is sched
        with pytest.raises(InputError, match="fixed at 10 steps.*--steps 10"):
            sched.with_steps(12)
    assert Schedule.parse("uniform:3", 10).with_steps(12).full_steps() == [0, 3, 6, 9]
    manifest = {"unets": {"unet": {"graphs": {"full": "unet.full", "inherit": "unet.inherit"}},
                          "twin": {"graphs": {"full": "twin.full", "inherit": "twin.inherit"}}}}
    config = DDIMScheduler.from_pretrained(str(tiny_dir), subfolder="scheduler").config
    ddim, pndm = DDIMScheduler.from_config(config), PNDMScheduler.from_config(config)
    for scheduler in (ddim, pndm):
        scheduler.set_timesteps(10)
    assert [r for _, r in call_plan(manifest, explicit, ddim)] == \
        ["full", "inherit", "inherit", "inherit", "full", "inherit", "inherit", "full", "inherit", "inherit"]
    calls = len(pndm.timesteps)  # more than 10: PNDM evaluates some timesteps twice
    assert calls > 10
    for sched in (explicit, switching):
        with pytest.raises(InputError, match=f"PNDMScheduler calls the UNet {calls} times for 10 steps"):
            call_plan(manifest, sched, pndm)
    uniform = [r for _, r in call_plan(manifest, Schedule.parse("uniform:3", 10), pndm)]
    ts = [float(t) for t in pndm.timesteps]
    assert len(uniform) == calls and uniform[0] == "full" and "inherit" in uniform
    assert all(uniform[i] == uniform[i - 1] for i in range(1, calls) if ts[i] == ts[i - 1])  # one role a timestep


def test_step_graphs_refuses_unets_and_roles_the_bundle_lacks():
    from asdm_export.runtime.denoise import step_graphs

    inherit = {"unets": {"unet": {"graphs": {"full": "unet.full", "inherit": "unet.inherit"}}}}
    plain = {"unets": {"unet": {"graphs": {"plain": "unet"}}}}
    assert step_graphs(inherit, Schedule.parse("uniform:2", 4)) == \
        [("unet.full", "full"), ("unet.inherit", "inherit")] * 2
    assert step_graphs(plain, Schedule.parse("full", 3)) == [("unet", "plain")] * 3
    with pytest.raises(InputError, match="exported without inheritance; its schedule must be 'full'"):
        step_graphs(plain, Schedule.parse("uniform:2", 4))
    switching = Schedule.parse("uniform:2", 4, "unet:0-1,ghost:2-3", ("unet", "ghost"))
    with pytest.raises(InputError, match="uses UNet 'ghost', which the bundle does not have"):
        step_graphs(inherit, switching)


def _hooked_unet_oracle(tiny_dir, points: list[str], reuse: str, a: dict, b: dict):
    """Independent of the project's wrappers: the plain diffusers UNet with forward hooks. At input ``a`` each
    point's output (``reuse == "output"``) or output - input (``"residual"``) is recorded; at input ``b`` each
    point's output is replaced by that value (plus its own input at b for residuals). Returns (recorded values,
    noise prediction at b)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_dir / "unet")).eval()
    recorded, handles = {}, []

    def first(out):
        return out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, tuple) else out.sample

    def given(args, kwargs):
        return args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))

    def replaced(out, value):
        if isinstance(out, torch.Tensor):
            return value
        return (value, *out[1:]) if isinstance(out, tuple) else type(out)(sample=value)

    def run(feeds):
        with torch.no_grad():
            return unet(*(torch.from_numpy(feeds[k]) for k in ("sample", "timestep", "encoder_hidden_states"))).sample

    for p in points:
        def record(mod, args, kwargs, out, p=p):
            recorded[p] = first(out) - (given(args, kwargs) if reuse == "residual" else 0)
        handles.append(unet.get_submodule(p).register_forward_hook(record, with_kwargs=True))
    run(a)
    for h in handles:
        h.remove()
    for p in points:
        def substitute(mod, args, kwargs, out, p=p):
            return replaced(out, recorded[p] + (given(args, kwargs) if reuse == "residual" else 0))
        unet.get_submodule(p).register_forward_hook(substitute, with_kwargs=True)
    return recorded, run(b).numpy()


@pytest.fixture(scope="module")
def residual_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("residual") / "b"
    spec = InheritanceSpec("layer", points=("down_blocks.1.attentions.0", "mid_block.resnets.1"), reuse="residual")
    return out, export_bundle("asdm:tiny", out, inheritance=spec, schedule=Schedule.parse("uniform:3", 10),
                              batch=(2, 2, 2), latent=(8, 16, 16))


@pytest.mark.parametrize("level", ["layer", "unit", "residual"])
def test_inherit_graph_equals_a_hooked_diffusers_unet(bundles, residual_bundle, tiny_dir, level):
    """The ORT full graph at input A emits what hooks on the plain UNet record there, and the inherit graph at
    input B fed with A's cache predicts what the plain UNet predicts at B with those values substituted."""
    bundle, manifest = residual_bundle if level == "residual" else bundles[level]
    points = manifest["unets"]["unet"]["points"]
    reuse = manifest["unets"]["unet"]["inheritance"].get("reuse", "output")
    assert reuse == ("residual" if level == "residual" else "output") and points
    a, b = feeds(h=8, w=16, t=700.0, seed=1), feeds(h=8, w=16, t=500.0, seed=2)
    recorded, expected = _hooked_unet_oracle(tiny_dir, points, reuse, a, b)
    ort = OrtBackend(bundle)
    full = {k: v.numpy() for k, v in ort.run("unet.full", a).items()}
    for p in points:
        assert rel_l2(full[f"cache.{p}"], recorded[p].numpy()) <= 1e-5, p
    cache = {k: v for k, v in full.items() if k.startswith("cache.")}
    got = ort.run("unet.inherit", {**b, **cache})["noise_pred"].numpy()
    assert rel_l2(got, expected) <= 1e-5
    plain_b = ort.run("unet.full", b)["noise_pred"].numpy()
    assert rel_l2(got, plain_b) > 1e-4  # A's cache really changes the prediction at B


def test_a_point_pattern_names_a_module_at_any_depth(tiny_dir):
    """`--points attn2` is `*.attn2`: every cross-attention unit (what `asdm-export points` lists as
    ...attn2), as `*.attn2` itself; in the UNet's order."""
    from asdm_export.graphs.inheritance import candidate_points, resolve_points

    unet = resolve_model(str(tiny_dir)).load_unet()
    short = resolve_points(unet, InheritanceSpec("unit", points=("attn2",)))
    every = [c for c in candidate_points(unet, "unit") if c.endswith(".attn2")]
    assert short == every == resolve_points(unet, InheritanceSpec("unit", points=("*.attn2",))) and len(short) > 1


def test_model_overrides_the_main_unet_and_the_pipeline_only_where_they_were_one(monkeypatch):
    """`check --model M` stands in for the main UNet's model: the other UNets of a multi-UNet bundle keep their
    own, and the pipeline (text encoder, VAE) is M's only where the main UNet came from the pipeline's model (a
    student's bundle compares its text encoder with the teacher's, not the student's)."""
    from asdm_export.runtime import reference

    opened = []

    def reopen(recorded, what, allow_pickle, instead):
        opened.append(what)
        return f"recorded:{what}"

    monkeypatch.setattr(reference, "_recorded_source", reopen)
    monkeypatch.setattr(reference, "resolve_model", lambda model, *a: f"override:{model}")
    manifest = {"unets": {"unet": {"source": {"sha256": "s"}}, "early": {"source": {"sha256": "e"}}},
                "pipeline": {"tokenizer": "tokenizer"}, "source": {"sha256": "s"}}
    unets, pipeline = reference.reference_sources(manifest, "M")
    assert unets == {"unet": "override:M", "early": "recorded:early"} and pipeline == "override:M"
    student = {**manifest, "source": {"sha256": "teacher"}}  # the main UNet is a student of the pipeline's teacher
    unets, pipeline = reference.reference_sources(student, "M")
    assert unets["unet"] == "override:M" and pipeline == "recorded:pipeline"
