"""ME-CondConv students on the tiny model: CLME experts, identity at init, folds, student folders, export + check."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asdm_export.assembly import assemble, build_student, randomize_routing, reparam, reparam_unet
from asdm_export.errors import InputError
from asdm_export.models.condconv import (AggregatedCondConv, MECondConv, per_sample_conv_grouped,
                                         per_sample_conv_matmul)
from asdm_export.models.loading import resolve_model
from asdm_export.models.student import AsdmUNet2DConditionModel, condconv_layers, save_student

TOL = 1e-5  # relative L2, fp32


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def teacher(tiny_dir):
    return resolve_model(str(tiny_dir)).load_unet()


def inputs(batch: int, seed: int = 0, timesteps=None, cfg: bool = False, latent: int = 16):
    """UNet inputs; ``cfg``: a classifier-free-guidance pair (same latent and timestep, two text embeddings)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    text = torch.randn(batch, 77, 32, generator=g)
    if cfg:
        x = x[:1].expand(batch, -1, -1, -1).contiguous()
        text[0] = 0.0  # the unconditional embedding
    t = torch.full((batch,), 500.0) if timesteps is None else torch.tensor(timesteps, dtype=torch.float32)
    return x, t, text


def run(unet, args):
    with torch.no_grad():
        return unet(*args, return_dict=False)[0]


def mixes(unet, args) -> dict[str, torch.Tensor]:
    """Every ME-CondConv layer's mix c (B, K) during one forward pass."""
    seen, handles = {}, []
    for name, m in condconv_layers(unet).items():
        if isinstance(m, MECondConv):
            handles.append(m.register_forward_hook(lambda mod, inp, out, n=name: seen.__setitem__(n, mod.mix(inp[0]))))
    try:
        run(unet, args)
    finally:
        for h in handles:
            h.remove()
    return seen


# ---- the per-sample convolution and the module --------------------------------------------------------

@pytest.mark.parametrize("kernel,padding", [(3, 1), (1, 0)])
def test_per_sample_conv_grouped_and_matmul_equal_a_loop_of_convs(kernel, padding):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 6, 10, generator=g)
    w = torch.randn(3, 5, 8, kernel, kernel, generator=g)
    b = torch.randn(3, 5, generator=g)
    loop = torch.cat([F.conv2d(x[i:i + 1], w[i], b[i], padding=padding) for i in range(3)])
    assert rel_l2(per_sample_conv_grouped(x, w, b, (padding, padding)), loop) < 1e-6
    assert rel_l2(per_sample_conv_matmul(x, w, b, (padding, padding)), loop) < 1e-6


@pytest.mark.parametrize("router", ["input", "timestep"])
def test_mecondconv_matches_its_definition(router):
    """Aggregated kernel + one conv == sum_k c_k conv(x, W_k) + sum_k c_k b_k == AggregatedCondConv."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 7, 3, padding=1)
    kernels = [(torch.randn(7, 6, 3, 3), torch.randn(7)) for _ in range(3)]
    layer = MECondConv.from_kernels(conv, kernels, router, temb_dim=16 if router == "timestep" else None)
    x = torch.randn(4, 6, 5, 5)
    layer.temb = torch.randn(4, 16)
    with torch.no_grad():
        fresh = layer(x)
        plain = F.conv2d(x, kernels[0][0], kernels[0][1], padding=1)
        assert torch.equal(layer.mix(x), torch.tensor([[1.0, 0.0, 0.0]]).expand(4, 3))  # exactly, not approximately
        assert rel_l2(fresh, plain) < 1e-6
        layer.gate.copy_(torch.tensor([0.7, 1.3]))
        c = layer.mix(x)
        assert torch.allclose(c.sum(1), torch.ones(4)) and c.std(0).max() > 1e-3  # per-sample mixes
        naive = sum(c[:, k, None, None, None] * F.conv2d(x, w, b, padding=1) for k, (w, b) in enumerate(kernels))
        assert rel_l2(layer(x), naive) < 1e-6
        layer.impl = "naive"
        assert rel_l2(layer(x), naive) < 1e-6
        layer.impl = "aggregate"
        agg = layer.aggregated()
        agg.temb = layer.temb
        assert isinstance(agg, AggregatedCondConv) and rel_l2(agg(x), naive) < 1e-6
        # the mix against its formula, written out: c = [1 - sum g s, g s], s = sigmoid(Linear(r)), r the input's
        # spatial mean or the time embedding; a trained gate may be negative (a move past the own kernel)
        r = x.mean(dim=(2, 3)) if router == "input" else layer.temb
        for gate in ([0.7, 1.3], [-0.7, 1.3]):
            layer.gate.copy_(torch.tensor(gate))
            gs = torch.sigmoid(r @ layer.router.weight.T + layer.router.bias) * torch.tensor(gate)
            assert (layer.mix(x) - torch.cat([1 - gs.sum(1, keepdim=True), gs], 1)).abs().max() < 1e-6
        layer.gate.copy_(torch.tensor([0.0, 1.3]))
        assert not layer.mix_is_fixed()  # one expert gated off and another live: the mix still moves
        layer.gate.zero_()
        assert layer.mix_is_fixed()


def test_mecondconv_refuses_what_it_cannot_be():
    with pytest.raises(InputError, match="stride-1"):
        kernels = [(torch.zeros(4, 4, 3, 3), None)] * 2
        MECondConv.from_kernels(torch.nn.Conv2d(4, 4, 3, stride=2), kernels, "input", None)
    with pytest.raises(InputError, match="at least 2 experts"):
        MECondConv(4, 4, experts=1)
    with pytest.raises(InputError, match="unknown router"):
        MECondConv(4, 4, router="text")


# ---- assembly: CLME experts and identity at init -------------------------------------------------------

def test_clme_experts_are_the_removed_layers_kernels(teacher):
    student, spec = build_student(teacher, "bk-small", experts=3, router="input")
    t = teacher.state_dict()
    layers = spec["layers"]
    # down stage 0 (32 -> 32 channels): the removed resnet 1 has conv1/conv2 of the same shape
    e = layers["down_blocks.0.resnets.0.conv1"]["sources"]
    assert e == ["down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.1.conv1", "down_blocks.0.resnets.0.conv1"]
    w = student.get_submodule("down_blocks.0.resnets.0.conv1").weight
    assert torch.equal(w[0], t["down_blocks.0.resnets.0.conv1.weight"])
    assert torch.equal(w[1], t["down_blocks.0.resnets.1.conv1.weight"])
    assert torch.equal(w[2], w[0])  # too few donors: a copy of the own kernel
    # down stage 1 (32 -> 64): conv1 of the removed resnet 1 is 64 -> 64, another shape: no donor
    assert layers["down_blocks.1.resnets.0.conv1"]["sources"] == ["down_blocks.1.resnets.0.conv1"] * 3
    assert layers["down_blocks.1.resnets.0.conv2"]["sources"][1] == "down_blocks.1.resnets.1.conv2"
    # up stage (teacher resnets 0, 2 kept; 1 removed): both retained layers inherit resnet 1's conv2
    for p, own in ((0, 0), (1, 2)):
        assert layers[f"up_blocks.1.resnets.{p}.conv2"]["sources"][:2] == [
            f"up_blocks.1.resnets.{own}.conv2", "up_blocks.1.resnets.1.conv2"]
    # only stages that lost resnets get ME-CondConv; the 1x1 shortcut is not in the default set
    assert all(n.rsplit(".", 1)[1] in ("conv1", "conv2") for n in layers)
    assert len(layers) == 2 * (4 + 2 * 4)


@pytest.mark.parametrize("plan", ["bk-small", "bk-tiny", "asdm-shallow-lite"])
@pytest.mark.parametrize("router", ["input", "timestep"])
def test_identity_at_init(teacher, plan, router):
    plain, _ = build_student(teacher, plan, experts=1)
    student, spec = build_student(teacher, plan, experts=3, router=router)
    assert spec["layers"] and not condconv_layers(plain)
    args = inputs(2, timesteps=[100.0, 900.0])
    err = rel_l2(run(student, args), run(plain, args))
    print(f"identity at init, {plan}, router {router}: rel L2 {err:.2e}")
    assert err <= TOL
    # and the ME layers are live: once the gate opens, the output moves
    randomize_routing(student)
    assert rel_l2(run(student, args), run(plain, args)) > 1e-3


def test_bk_tiny_on_a_teacher_whose_innermost_stage_is_narrower_inherits_the_skip_part():
    """asdm:toyworld's stages are 32, 64, 96, 64 wide: without its innermost stage the first kept up resnet
    reads 96 deep channels where the teacher's read 64. It inherits the teacher's weights of the 96 skip
    channels; the new deep channels start at zero (norm: 1, 0), so the assembled stage computes, at first,
    what the teacher's skip part computed. Any other shape difference is still refused."""
    from asdm_export.assembly.assemble import partial_input
    from asdm_export.assembly.plans import load_plan, resolve_plan
    from asdm_export.models.loading import resolve_model

    toy = resolve_model("asdm:toyworld").load_unet()
    t = toy.up_blocks[1].resnets[0]
    for experts in (1, 2):
        student, _ = build_student(toy, "bk-tiny", experts=experts, router="timestep")
        s = student.up_blocks[0].resnets[0]
        conv1 = s.conv1.weight if experts == 1 else s.conv1.weight[0]  # ME-CondConv: expert 0, its own kernel
        assert tuple(conv1.shape)[:2] == (96, 192) and tuple(t.conv1.weight.shape)[:2] == (96, 160)
        assert torch.equal(conv1[:, 96:], t.conv1.weight[:, 64:].float()) and not conv1[:, :96].any()
        assert torch.equal(s.norm1.weight[96:], t.norm1.weight[64:].float()) and bool((s.norm1.weight[:96] == 1).all())
        assert torch.equal(s.conv_shortcut.weight[:, 96:], t.conv_shortcut.weight[:, 64:].float())
        conv2 = s.conv2.weight if experts == 1 else s.conv2.weight[0]
        assert torch.equal(conv2, t.conv2.weight.float())  # the output side: inherited whole
        x, ts, _ = inputs(2, timesteps=[100.0, 900.0])
        assert torch.isfinite(run(student, (x, ts, torch.randn(2, 16, 64)))).all()
    layout = resolve_plan(load_plan("bk-tiny"), dict(toy.config))
    assert partial_input(layout, "up_blocks.0.resnets.0.conv1.weight", (96, 160, 3, 3), (96, 192, 3, 3)) == (1, 96)
    assert partial_input(layout, "up_blocks.0.resnets.1.conv1.weight", (96, 160, 3, 3), (96, 192, 3, 3)) is None
    assert partial_input(layout, "up_blocks.0.resnets.0.conv2.weight", (96, 96, 3, 3), (64, 96, 3, 3)) is None


# ---- re-parameterization: folded == unfolded ------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(teacher):
    """Students whose routers mix per sample, as after training (gate open, random router)."""
    out = {}
    for router in ("input", "timestep"):
        student, _ = build_student(teacher, "bk-small", experts=3, router=router)
        randomize_routing(student, seed=1)
        out[router] = student
    return out


CASES = {  # name -> inputs
    "batch1": dict(batch=1),
    "cfg2": dict(batch=2, cfg=True),
    "batch3": dict(batch=3, seed=3),
    "batch4": dict(batch=4, seed=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dynamic_aggregation_equals_student_input_router(trained, case):
    student = trained["input"]
    deployed, report = reparam_unet(student)
    assert len(report["dynamic"]) == len(condconv_layers(student)) and not report["folded"]
    assert all(isinstance(m, AggregatedCondConv) for m in condconv_layers(deployed).values())
    args = inputs(**CASES[case])
    if case == "cfg2":
        c = mixes(student, args)
        spread = max(float((m[0] - m[1]).abs().max()) for m in c.values())
        print(f"CFG pair: largest difference of a mix weight between the two samples {spread:.3f}")
        assert spread > 1e-2  # the two samples of the CFG pair get different mixes
    err = rel_l2(run(deployed, args), run(student, args))
    print(f"input router, dynamic aggregation, {case}: rel L2 {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_timestep_router_folds_per_band_and_aggregates(trained, case):
    student = trained["timestep"]
    args = inputs(**CASES[case])  # every sample at t = 500
    folded, report = reparam_unet(student, band=(400, 601))
    assert report["t_fold"] == 500.0 and len(report["folded"]) == len(condconv_layers(student))
    assert not condconv_layers(folded)  # every ME layer is now a plain Conv2d
    err = rel_l2(run(folded, args), run(student, args))
    print(f"timestep router, static fold at t=500, {case}: rel L2 {err:.2e}")
    assert err <= TOL
    # Different timesteps per sample give different mixes: only dynamic aggregation is exact then.
    x, _, text = args
    t = torch.linspace(50, 950, x.shape[0])
    args = (x, t, text)
    if x.shape[0] > 1:
        c = mixes(student, args)
        assert max(float((m[0] - m[-1]).abs().max()) for m in c.values()) > 1e-2
    deployed, report = reparam_unet(student)
    err = rel_l2(run(deployed, args), run(student, args))
    print(f"timestep router, dynamic aggregation, {case}: rel L2 {err:.2e}")
    assert err <= TOL


def test_fold_is_exact_only_at_the_fold_timestep(trained):
    student = trained["timestep"]
    folded, report = reparam_unet(student, band=(0, 1000))
    assert report["max_mix_deviation"] > 1e-2  # the router really depends on the timestep
    # the recorded deviation is the largest over the band's integer timesteps and layers, measured here through
    # the UNet's own forward passes
    every = mixes(student, inputs(1000, timesteps=list(range(1000)), latent=8))
    at_fold = mixes(student, inputs(1, timesteps=[499.5], latent=8))
    largest = max(float((every[n] - at_fold[n]).abs().max()) for n in every)
    assert abs(report["max_mix_deviation"] - largest) < 1e-6, (report["max_mix_deviation"], largest)
    near = rel_l2(run(folded, inputs(2, timesteps=[499.5] * 2)), run(student, inputs(2, timesteps=[499.5] * 2)))
    far = rel_l2(run(folded, inputs(2, timesteps=[5.0] * 2)), run(student, inputs(2, timesteps=[5.0] * 2)))
    assert near <= TOL < far


@pytest.mark.parametrize("router", ["input", "timestep"])
def test_frozen_routers_fold_statically(trained, router):
    student = trained[router]
    frozen = copy.deepcopy(student)
    with torch.no_grad():
        for m in condconv_layers(frozen).values():
            m.router.weight.zero_()  # frozen: s = sigmoid(bias) for every input, the gate stays open
    folded, report = reparam_unet(frozen)
    assert len(report["folded"]) == len(condconv_layers(student)) and not report["dynamic"]
    for case in ("batch1", "cfg2", "batch4"):
        err = rel_l2(run(folded, inputs(**CASES[case])), run(frozen, inputs(**CASES[case])))
        print(f"{router} router frozen, static fold, {case}: rel L2 {err:.2e}")
        assert err <= TOL


def test_naive_form_equals_student_and_export_warns_of_it(trained, caplog):
    """The naive form computes what the student does, with K convolutions a layer: export says it is not for
    deployment (the aggregated form, the default, is)."""
    from asdm_export.export.export import warn_naive_condconv

    naive, report = reparam_unet(trained["input"], dynamic="naive")
    assert report["dynamic_form"] == "naive"
    args = inputs(2, cfg=True)
    assert rel_l2(run(naive, args), run(trained["input"], args)) <= TOL
    aggregated, _ = reparam_unet(trained["input"])
    with caplog.at_level("WARNING", logger="asdm_export"):
        warn_naive_condconv("unet", aggregated)
        assert not caplog.records
        warn_naive_condconv("unet", naive)
    layers = len(condconv_layers(trained["input"]))
    assert [r.getMessage() for r in caplog.records] == [
        f"UNet 'unet' has {layers} ME-CondConv layer(s) in the naive form (3 convolutions each): kept for "
        "comparison, not deployment; for deployment, `reparam --dynamic aggregate` (the default)"]


# ---- student folders, CLI-level API, export and check -------------------------------------------------

def test_assemble_writes_a_loadable_student_and_reparam_of_a_fresh_one_is_the_plain_student(tmp_path, teacher):
    manifest = assemble("asdm:tiny", "bk-tiny", tmp_path / "s", experts=2, router="timestep")
    assert manifest["kind"] == "student" and manifest["condconv_layers"] == 18
    assert {"config.json", "diffusion_pytorch_model.safetensors", "asdm_student.json"} <= set(manifest["files"])
    rows = {r["stage"]: r for r in manifest["comparison"]["rows"]}
    assert rows["down_blocks.3"]["student_stage"] is None and rows["mid_block"]["student_stage"] is None
    assert rows["up_blocks.1"]["student_stage"] == "up_blocks.0"
    assert rows["total"]["student_macs"] < rows["total"]["teacher_macs"]
    loaded = resolve_model(str(tmp_path / "s")).load_unet()
    assert isinstance(loaded, AsdmUNet2DConditionModel)
    in_memory, _ = build_student(teacher, "bk-tiny", experts=2, router="timestep")
    args = inputs(2, timesteps=[10.0, 990.0])
    assert torch.equal(run(loaded, args), run(in_memory, args))
    # a fresh student folds back to the plain pruned student, weight for weight
    reparam(str(tmp_path / "s"), tmp_path / "d")
    deployed = resolve_model(str(tmp_path / "d")).load_unet()
    plain, _ = build_student(teacher, "bk-tiny", experts=1)
    assert json.loads((tmp_path / "d" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    sd, sp = deployed.state_dict(), plain.state_dict()
    assert sd.keys() == sp.keys() and all(torch.equal(sd[k], sp[k]) for k in sd)
    # without ME-CondConv layers a student folder is a plain diffusers UNet folder
    from diffusers import UNet2DConditionModel

    by_diffusers = UNet2DConditionModel.from_pretrained(str(tmp_path / "d")).eval()
    assert torch.equal(run(by_diffusers, args), run(plain, args))


def test_reparam_bands_write_one_student_per_band(tmp_path, trained):
    save_student(trained["timestep"], tmp_path / "s", trained["timestep"].asdm_spec)
    manifest = reparam(str(tmp_path / "s"), tmp_path / "b", bands="0:500:1000")
    assert manifest["kind"] == "student-bands" and [b["model"] for b in manifest["bands"]] == [
        "band-0000-0500", "band-0500-1000"]
    student = resolve_model(str(tmp_path / "s")).load_unet()
    for band, t in (("band-0000-0500", 249.5), ("band-0500-1000", 749.5)):
        unet = resolve_model(str(tmp_path / "b" / band)).load_unet()
        assert not condconv_layers(unet)
        args = inputs(2, timesteps=[t, t])
        assert rel_l2(run(unet, args), run(student, args)) <= TOL
    with pytest.raises(InputError, match="no timestep-routed"):
        reparam_unet(trained["input"], band=(0, 500))
    with pytest.raises(InputError, match="increasing"):
        reparam(str(tmp_path / "s"), tmp_path / "y", bands="500:100")
    with pytest.raises(InputError, match="not an assembled student"):
        reparam("asdm:tiny", tmp_path / "z")


def test_a_switch_that_runs_a_band_outside_its_timesteps_is_a_warning(tmp_path, trained, caplog):
    """Band folds are exact at their band's centre: a --switch mapping steps to the wrong band says so (20 DDIM
    steps of asdm:tiny: steps 0-9 have t 951..501, steps 10-19 t 451..1)."""
    from asdm_export.export import export_bundle
    from asdm_export.export.export import warn_steps_outside_bands
    from asdm_export.graphs.schedule import Schedule

    save_student(trained["timestep"], tmp_path / "s", trained["timestep"].asdm_spec)
    reparam(str(tmp_path / "s"), tmp_path / "b", bands="0:500:1000")
    unets = {"unet": str(tmp_path / "b" / "band-0000-0500"), "early": str(tmp_path / "b" / "band-0500-1000")}
    sources = {name: resolve_model(path) for name, path in unets.items()}
    model = resolve_model("asdm:tiny")
    right = Schedule.parse("full", 20, "early:0-9,unet:10-19", ("unet", "early"))
    with caplog.at_level("WARNING", logger="asdm_export"):
        warn_steps_outside_bands(sources, right, model)
        assert not caplog.records
        export_bundle("asdm:tiny", tmp_path / "x", unets=unets, unet_only=True, batch=(1, 1, 1), latent=(16, 16, 16),
                      schedule=Schedule.parse("full", 20, "unet:0-9,early:10-19", ("unet", "early")))
    assert [r.getMessage() for r in caplog.records if "is folded for timesteps" in r.getMessage()] == [
        "UNet 'unet' is folded for timesteps 0-499, but the schedule runs it at 10 step(s) outside them (step 0: "
        "t 951); with DDIMScheduler at 20 steps, give it the steps whose timesteps fall in its band (--switch)",
        "UNet 'early' is folded for timesteps 500-999, but the schedule runs it at 10 step(s) outside them (step 10: "
        "t 451); with DDIMScheduler at 20 steps, give it the steps whose timesteps fall in its band (--switch)"]


def test_student_folder_errors(tmp_path, trained):
    folder = tmp_path / "s"
    save_student(trained["input"], folder, trained["input"].asdm_spec)
    spec = json.loads((folder / "asdm_student.json").read_text())
    spec["layers"].pop(next(iter(spec["layers"])))
    (folder / "asdm_student.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match="weights do not match asdm_student.json"):
        resolve_model(str(folder)).load_unet()
    # edited by hand: an AttributeError or a TypeError inside the loader before
    name, entry = next(iter(spec["layers"].items()))
    for layers, needle in (([], "layers is not a mapping"), ({name: {**entry, "experts": "3"}}, "experts is not a"),
                           ({"down_blocks.9.resnets.0.conv1": entry}, "which is not a resnet convolution")):
        (folder / "asdm_student.json").write_text(json.dumps({**spec, "layers": layers}))
        with pytest.raises(InputError, match=needle):
            resolve_model(str(folder)).load_unet()
    for edit, needle in (({"format_version": "2"}, "format_version is not int"), ({"gri": "x"}, "gri is not a"),
                         ({"gri": {"layers": 5, "window": 8, "pool": 8}}, "gri.layers is not a list")):
        (folder / "asdm_student.json").write_text(json.dumps({**spec, **edit}))  # each was a TypeError
        with pytest.raises(InputError, match=needle):
            resolve_model(str(folder)).load_unet()
    # a newer release's student, whose fields this one may not know: "upgrade", not "damaged"
    (folder / "asdm_student.json").write_text(json.dumps({**spec, "format_version": 99, "gri": {"window": [4, 4]}}))
    with pytest.raises(InputError, match="has format version 99; .*upgrade asdm-export"):
        resolve_model(str(folder)).load_unet()
    save_student(trained["input"], tmp_path / "t", trained["input"].asdm_spec)
    with pytest.raises(InputError, match="assemble from a plain UNet"):
        assemble(str(tmp_path / "t"), "bk-tiny", tmp_path / "u")


@pytest.mark.parametrize("router,form", [("input", "deployed"), ("timestep", "student")])
def test_exported_condconv_student_passes_check(tmp_path, trained, router, form):
    from asdm_export.check import check_bundle
    from asdm_export.export import export_bundle

    unet = trained[router]
    if form == "deployed":
        unet, report = reparam_unet(unet)
        assert report["dynamic"]
    folder = tmp_path / "student"
    save_student(unet, folder, unet.asdm_spec)
    manifest = export_bundle(str(folder), tmp_path / "bundle")
    ops = manifest["graphs"][0]["ops"]
    report = check_bundle(tmp_path / "bundle", out=tmp_path / "report")
    worst = report["graphs"][0]["backends"]["ort-cpu"]["worst"]
    print(f"{router} router, {form} form: ORT vs torch rel L2 {worst['rel_l2']:.2e}, max abs {worst['max_abs']:.2e}; "
          f"{ops.get('Conv', 0)} Conv, {ops.get('MatMul', 0)} MatMul nodes")
    assert report["passed"], worst
    points = report["graphs"][0]["backends"]["ort-cpu"]["points"]
    assert {p["dims"]["batch"] for p in points} == {1, 2, 4}  # one graph, several batch sizes
    # never K convolutions: each plain Conv2d exports as one Conv node, each dynamic ME-CondConv as one MatMul
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())
    assert ops["Conv"] == n_conv and ops["MatMul"] >= len(condconv_layers(unet))


def test_student_unet_inside_a_pipeline_folder(tmp_path, tiny_dir, trained):
    folder = tmp_path / "pipe"
    shutil.copytree(tiny_dir, folder)
    shutil.rmtree(folder / "unet")
    save_student(trained["input"], folder / "unet", trained["input"].asdm_spec)
    pipe = resolve_model(str(folder)).load_pipeline()
    assert isinstance(pipe.unet, AsdmUNet2DConditionModel)
    args = inputs(2, cfg=True)
    assert torch.equal(run(pipe.unet, args), run(trained["input"], args))
    assert np.isfinite(run(pipe.unet, args).numpy()).all()
