"""Pruning plans: presets against BK-SDM's published structures and sizes, plan-file validation, CLI errors."""

from __future__ import annotations

import json
import math

import click
import pytest
import torch
from click.testing import CliRunner
from diffusers import UNet2DConditionModel

from asdm_export.assembly.assemble import plan_student, plan_table, teacher_config
from asdm_export.assembly.plans import PRESETS, load_plan, parse_plan, resolve_plan
from asdm_export.cli.assembly import COMMANDS
from asdm_export.cli.group import AsdmGroup
from asdm_export.errors import InputError
from asdm_export.models.presets import PRESETS as MODEL_PRESETS

# BK-SDM's model card: U-Net sizes 0.86B (SD-v1.4), 0.58B / 0.49B / 0.33B (base / small / tiny).
BK_PUBLISHED = {"teacher": 0.86e9, "bk-base": 0.58e9, "bk-small": 0.49e9, "bk-tiny": 0.33e9}
# BK-SDM's released student configs (src/unet_config/bk_*/config.json), the fields that differ from SD1.x.
BK_CONFIGS = {
    "bk-base": dict(layers_per_block=1, mid_block_type="UNetMidBlock2DCrossAttn",
                    block_out_channels=[320, 640, 1280, 1280]),
    "bk-small": dict(layers_per_block=1, mid_block_type=None, block_out_channels=[320, 640, 1280, 1280]),
    "bk-tiny": dict(layers_per_block=1, mid_block_type=None, block_out_channels=[320, 640, 1280],
                    down_block_types=["CrossAttnDownBlock2D"] * 3, up_block_types=["CrossAttnUpBlock2D"] * 3),
}


@pytest.fixture(scope="module")
def sd15_cfg():
    return teacher_config("asdm:sd15")  # from the preset's config, on the meta device: nothing is written


@pytest.fixture(scope="module")
def tiny_cfg():
    return teacher_config("asdm:tiny")


def _params(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UNet2DConditionModel(**cfg).parameters())


@pytest.mark.parametrize("name", ["bk-base", "bk-small", "bk-tiny"])
def test_bk_presets_build_bk_sdms_released_configs(name, sd15_cfg):
    layout = resolve_plan(PRESETS[name], sd15_cfg)
    bk = {**sd15_cfg, **BK_CONFIGS[name]}
    assert _params(layout.config) == _params(bk)
    assert list(layout.config["down_block_types"]) == list(bk["down_block_types"])
    assert list(layout.config["up_block_types"]) == list(bk["up_block_types"])
    assert layout.config["mid_block_type"] == bk["mid_block_type"]
    assert list(layout.config["block_out_channels"]) == bk["block_out_channels"]
    assert set(layout.config["layers_per_block"]) == {1}


def test_preset_parameter_counts_against_bk_sdm_published_sizes(sd15_cfg):
    """Counted on the SD1.5 UNet config (meta device). BK-SDM's published sizes are the counts rounded *up*
    to 0.01B (579.4M -> 0.58B, 482.3M -> 0.49B, 323.4M -> 0.33B, 859.5M -> 0.86B)."""
    table = {r["plan"]: r["params"] for r in plan_table("asdm:sd15")["rows"]}
    assert table["teacher"] == 859_520_964
    for name, published in BK_PUBLISHED.items():
        count = table[name]
        rel = abs(count - published) / published
        print(f"{name}: {count / 1e6:.1f}M vs published {published / 1e9:.2f}B ({rel:.2%} below)")
        assert math.ceil(count / 1e7) / 100 == pytest.approx(published / 1e9)
        # bk-tiny is 2.004% below its rounded-up 0.33B (0.3234B exactly, BK-SDM's own config): the one
        # published size a literal 2% bound misses, by 0.004 points.
        assert rel <= (0.02 if name != "bk-tiny" else 0.0201)
    assert table["bk-base"] == 579_384_964 and table["bk-small"] == 482_346_884 and table["bk-tiny"] == 323_384_964


def test_asdm_presets_remove_layers_from_the_shallow_stages_first(sd15_cfg):
    table = {r["plan"]: r for r in plan_table("asdm:sd15")["rows"]}
    teacher = table["teacher"]
    for name in ("asdm-shallow", "asdm-shallow-lite"):
        layout = resolve_plan(PRESETS[name], sd15_cfg)
        lost = {s.teacher for s in layout.stages if s.removed}
        assert lost == {"down_blocks.0", "down_blocks.1", "up_blocks.2", "up_blocks.3"}  # the 64x64 and 32x32 stages
        if name == "asdm-shallow-lite":
            no_attention = {s.teacher for s in layout.stages if not s.attention}
            assert {"down_blocks.0", "up_blocks.3"} <= no_attention
        # few parameters (the shallow stages are thin) but many MACs (they run at high resolution)
        assert table[name]["params"] / teacher["params"] > 0.9
        assert table[name]["macs"] / teacher["macs"] < 0.8
    assert table["asdm-shallow-lite"]["macs"] < table["asdm-shallow"]["macs"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_resolves_on_the_tiny_model_and_round_trips_as_yaml(name, tiny_cfg, tmp_path):
    plan = PRESETS[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(plan.to_yaml())
    assert load_plan(str(path)) == plan
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(plan.to_dict()))
    assert load_plan(str(path)) == plan
    layout, layers, student = plan_student(plan, tiny_cfg, experts=2)
    assert layers, "every preset removes resnets somewhere, so ME-CondConv layers exist"


def test_bk_tiny_inherits_up_stages_shifted_by_the_dropped_stage(tiny_cfg):
    layout = resolve_plan(PRESETS["bk-tiny"], tiny_cfg)
    assert layout.dropped == 1
    # BK-SDM's copy rule: student up stage j <- teacher up stage j+1, resnets (0, 1) <- teacher (0, 2)
    assert layout.teacher_key("up_blocks.0.resnets.1.conv1.weight") == "up_blocks.1.resnets.2.conv1.weight"
    assert layout.teacher_key("up_blocks.0.attentions.1.proj_in.weight") == "up_blocks.1.attentions.2.proj_in.weight"
    assert layout.teacher_key("up_blocks.0.upsamplers.0.conv.weight") == "up_blocks.1.upsamplers.0.conv.weight"
    assert layout.teacher_key("down_blocks.2.resnets.0.conv1.weight") == "down_blocks.2.resnets.0.conv1.weight"
    assert layout.teacher_key("conv_in.weight") == "conv_in.weight"


# ---- bad plans -----------------------------------------------------------------------------------------

BAD_PLANS = [
    ({"down_blocks": {7: {"resnets": [0]}}}, "names down_blocks.7, but the teacher has down_blocks.0 to down_blocks.3"),
    ({"side_blocks": {}}, "unknown block or key 'side_blocks'"),
    ({"down_blocks": {"first": {"resnets": [0]}}}, "unknown block 'down_blocks.first'"),
    ({"down_blocks": {1: {"resnets": []}}}, "down_blocks.1 keeps no resnet; keep at least one, or remove the stage"),
    ({"down_blocks": {1: {"resnets": "0"}}}, "down_blocks.1.resnets must be a list of layer indices"),
    ({"down_blocks": {1: {"resnets": [1, 0]}}}, "distinct indices in increasing order"),
    ({"down_blocks": {1: {"resnets": [0, 5]}}}, "keeps resnet 5, but the teacher stage has resnets 0 to 1"),
    ({"up_blocks": {0: {"resnets": [0, 1, 3]}}},
     "up_blocks.0 keeps resnet 3, but the teacher stage has resnets 0 to 2"),
    ({"down_blocks": {1: {"resnet": [0]}}}, "unknown key 'resnet'"),
    ({"down_blocks": {1: [0]}}, "must be a mapping like {resnets: [0]}"),
    ({"mid_block": "no"}, "mid_block must be true (keep) or false (remove)"),
    ({"down_blocks": {1: {"drop": "yes"}}}, "drop must be true or false"),
    ({"down_blocks": {0: {"resnets": [0], "attentions": [1]}}}, "attentions must equal its resnets"),
    ({"down_blocks": {0: {"resnets": [0]}}}, "up_blocks.3 keeps 3 resnets but its mirror down_blocks.0 keeps 1"),
    ({"down_blocks": {1: {"drop": True}}, "up_blocks": {2: {"drop": True}}}, "only the innermost stages"),
    ({"down_blocks": {3: {"drop": True}}}, "are dropped together: drop down_blocks.3 with up_blocks.0"),
    ({"up_blocks": {0: {"drop": True}}}, "are dropped together: drop down_blocks.3 with up_blocks.0"),
    ({"down_blocks": {1: {"resnets": [1]}}, "up_blocks": {2: {"resnets": [0, 2]}}},
     "student down_blocks.1.resnets.0 would inherit teacher down_blocks.1.resnets.1, whose norm1.weight"),
    ([1, 2], "must be a mapping"),
]


@pytest.mark.parametrize("data,message", BAD_PLANS, ids=[m[:40] for _, m in BAD_PLANS])
def test_bad_plans_give_one_clear_line(data, message, tiny_cfg, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as err:
        plan_student(load_plan(str(path)), tiny_cfg, experts=2)
    text = str(err.value)
    assert message in text, text
    assert "\n" not in text


def test_bad_plan_files(tmp_path):
    (tmp_path / "broken.yaml").write_text("down_blocks: {0: [resnets: }\n")
    with pytest.raises(InputError, match="is not valid YAML"):
        load_plan(str(tmp_path / "broken.yaml"))
    (tmp_path / "plan.txt").write_text("{}")
    with pytest.raises(InputError, match="must end in .yaml, .yml or .json"):
        load_plan(str(tmp_path / "plan.txt"))
    with pytest.raises(InputError, match="neither a preset .* nor a plan file"):
        load_plan("bk-huge")
    assert parse_plan({}, "empty.yaml").name == "empty"  # an empty plan keeps everything


# ---- CLI -----------------------------------------------------------------------------------------------

@click.group(cls=AsdmGroup)
@click.pass_context
def cli(ctx):
    """The commands as cli.py registers them, under the same error handling as `asdm-export`."""
    ctx.obj = {"verbosity": 0}


for _command in COMMANDS:
    cli.add_command(_command)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_bad_plan_exits_2_with_one_error_line(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("down_blocks:\n  1: {resnets: []}\n")
    result = run("assemble", "--model", "asdm:tiny", "--plan", path, "--out", tmp_path / "s")
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "keeps no resnet" in lines[0], result.stderr
    assert not (tmp_path / "s").exists()
    result = run("assemble", "--model", "asdm:tiny", "--plan", "bk-huge", "--out", tmp_path / "s")
    assert result.exit_code == 2 and result.stderr.startswith("error: plan 'bk-huge' is neither a preset")
    result = run("assemble", "--model", "asdm:tiny", "--plan", "bk-small", "--convs", "conv9", "--out", tmp_path / "s")
    assert result.exit_code == 2 and "--convs takes" in result.stderr


def test_cli_plans_lists_presets_with_counts_and_shows_yaml():
    result = run("plans", "--model", "asdm:tiny")
    assert result.exit_code == 0, result.output
    for name in ["teacher", *PRESETS]:
        assert name in result.output
    assert "3.2M" in result.output  # the tiny teacher's 3.22M parameters
    result = run("plans", "--show", "bk-small")
    assert result.exit_code == 0
    assert parse_plan(__import__("yaml").safe_load(result.output)) == PRESETS["bk-small"]


def test_cli_plans_on_the_default_model_marks_a_plan_that_does_not_fit(monkeypatch):
    # every preset fits the toy world, bk-tiny too (its first up resnet inherits the skip part of a wider input)
    rows = {r["plan"]: r for r in plan_table("asdm:toyworld")["rows"]}
    assert rows["bk-tiny"]["params"] < rows["bk-small"]["params"] < rows["teacher"]["params"]
    misfit = parse_plan({"down_blocks": {1: {"resnets": [1]}}, "up_blocks": {2: {"resnets": [0, 2]}}})
    monkeypatch.setitem(PRESETS, "misfit", misfit)
    result = run("plans")
    assert result.exit_code == 0, result.output
    assert "asdm:toyworld" in result.output and "does not fit this teacher" in result.output
    assert "bk-tiny" in result.output
    with pytest.raises(InputError, match="would inherit teacher down_blocks.1.resnets.1"):
        plan_table("asdm:toyworld", plans=["misfit"])


def test_help_of_each_command():
    for name in ("plans", "assemble", "reparam"):
        result = run(name, "--help")
        assert result.exit_code == 0 and "Example" in result.output


def test_sd15_preset_config_matches_the_embedded_model():
    # teacher_config reads embedded presets without writing them: it must equal what the preset builds.
    cfg = teacher_config("asdm:sd15")
    for key, value in MODEL_PRESETS["sd15"].unet.items():
        assert cfg[key] == (list(value) if isinstance(value, tuple) else value)


def test_per_stage_layer_counts_mirror_and_donors_are_the_nearest_removed_resnets(tiny_cfg):
    """A teacher with its own resnet count per stage (the up stages mirror the down ones, plus one), and a stage
    that loses two resnets: each retained conv's expert is the nearest removed resnet's kernel, not the first."""
    cfg = {**tiny_cfg, "layers_per_block": [1, 2, 2, 3]}
    layout = resolve_plan(parse_plan({}), cfg)  # keep everything
    assert [s.teacher_layers for s in layout.stages if s.teacher.startswith("up")] == [4, 3, 3, 2]
    plan = parse_plan({"down_blocks": {3: {"resnets": [0]}}, "up_blocks": {0: {"resnets": [0, 3]}}})
    _, layers, _ = plan_student(plan, cfg, experts=2)
    assert layers["up_blocks.0.resnets.0.conv2"]["sources"] == ["up_blocks.0.resnets.0.conv2",
                                                                 "up_blocks.0.resnets.1.conv2"]
    assert layers["up_blocks.0.resnets.1.conv2"]["sources"] == ["up_blocks.0.resnets.3.conv2",
                                                                 "up_blocks.0.resnets.2.conv2"]


def test_only_stages_that_lost_resnets_get_me_condconv_layers(sd15_cfg):
    for name in ("bk-small", "asdm-shallow"):
        layout, layers, _ = plan_student(name, sd15_cfg, experts=2)
        lost = {s.student for s in layout.stages if s.removed and s.student}
        assert layers and {n.rsplit(".resnets.", 1)[0] for n in layers} == lost, name
