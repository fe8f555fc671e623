"""The command line's defaults are the Python API's: the CLI is a shell over the API, and a default changed in one
place and not the other makes them two tools (the export schedule was `uniform:3` on the command line and `full`
from Python). Click needs its defaults when the CLI is imported, before the API's heavy modules are, so each
pair is written twice and held equal here."""

from __future__ import annotations

import dataclasses
import inspect

import click
import pytest

from asdm_export.cli.group import main


def cli_default(path: str, option: str):
    command = main
    for name in path.split():
        command = command.commands[name]
    (param,) = [p for p in command.params if p.name == option]
    return param.default


def api_default(fn, name: str):
    if dataclasses.is_dataclass(fn):
        field = fn.__dataclass_fields__[name]
        return field.default_factory() if field.default is dataclasses.MISSING else field.default
    return inspect.signature(fn).parameters[name].default


def pairs():
    from asdm_export.assembly.assemble import DEFAULT_CONVS, DEFAULT_EXPERTS, assemble
    from asdm_export.assembly.reparam import reparam
    from asdm_export.check.check import check_bundle
    from asdm_export.distill import DistillRecipe, distill
    from asdm_export.distill.losses import parse_losses
    from asdm_export.export.export import MIN_OPSET, export_bundle
    from asdm_export.graphs.inheritance import InheritanceSpec
    from asdm_export.graphs.schedule import DEFAULT_STEPS
    from asdm_export.int8.calibrate import calibrate_bundle
    from asdm_export.int8.quantize import quantize_bundle
    from asdm_export.models.gri import DEFAULT_POOL, DEFAULT_WINDOW
    from asdm_export.models.presets import DEFAULT_MODEL
    from asdm_export.runtime.pipeline import ImageRequest
    from asdm_export.serve.client import request_inputs
    from asdm_export.serve.repo import DEPLOY_DELAY_US, SERVE_DELAY_US, write_triton_repo
    from asdm_export.serve.server import serve
    from asdm_export.toyworld.quality import QualitySettings

    def csv(text):
        return tuple(t for t in text.split(",") if t)

    def span(text):
        return tuple(int(t) for t in text.split(":"))

    same = lambda v: v  # noqa: E731
    return [  # (command, option, its value as the API takes it, the API's default)
        ("export", "model", same, DEFAULT_MODEL),
        ("demo", "model", same, DEFAULT_MODEL),
        ("distill", "teacher", same, DEFAULT_MODEL),
        ("export", "precision", same, api_default(export_bundle, "precision")),
        ("export", "opset", same, api_default(export_bundle, "opset")),
        ("export", "opset", same, MIN_OPSET),
        ("export", "batch", span, api_default(export_bundle, "batch")),
        ("export", "reuse", same, api_default(InheritanceSpec, "reuse")),
        ("export", "steps", same, DEFAULT_STEPS),
        ("assemble", "experts", same, DEFAULT_EXPERTS),
        ("assemble", "experts", same, api_default(assemble, "experts")),
        ("assemble", "router", same, api_default(assemble, "router")),
        ("assemble", "convs", csv, DEFAULT_CONVS),
        ("assemble", "gri_window", same, DEFAULT_WINDOW),
        ("assemble", "gri_pool", same, DEFAULT_POOL),
        ("reparam", "dynamic", same, api_default(reparam, "dynamic")),
        ("distill", "losses", parse_losses, api_default(DistillRecipe, "losses")),
        *[("distill", name, same, api_default(DistillRecipe, name))
          for name in ("steps", "incubate_steps", "batch", "lr", "seed", "checkpoint_every")],
        ("distill", "images", same, api_default(distill, "images")),
        ("distill", "data", same, api_default(distill, "data")),
        ("distill", "save_precision", same, api_default(distill, "save_dtype")),
        ("check", "guidance", same, api_default(check_bundle, "guidance")),
        ("run", "guidance", same, api_default(ImageRequest, "guidance_scale")),
        ("run", "negative_prompt", same, api_default(ImageRequest, "negative_prompt")),
        ("client", "guidance", same, api_default(request_inputs, "guidance_scale")),
        ("client", "guidance", same, api_default(ImageRequest, "guidance_scale")),
        ("client", "negative_prompt", same, api_default(request_inputs, "negative_prompt")),
        ("calibrate", "samples", same, api_default(calibrate_bundle, "samples")),
        ("calibrate", "per_graph", same, api_default(calibrate_bundle, "per_graph")),
        ("calibrate", "guidance", same, api_default(calibrate_bundle, "guidance")),
        ("quantize", "precision", same, api_default(quantize_bundle, "precision")),
        ("quantize", "method", same, api_default(quantize_bundle, "method")),
        *[("quality", name, same, api_default(QualitySettings, name)) for name in ("samples", "steps", "guidance")],
        ("serve", "delay_ms", lambda ms: round(ms * 1000), SERVE_DELAY_US),
        ("serve", "instances", same, api_default(serve, "instances")),
        ("serve", "host", same, api_default(serve, "host")),
        ("serve", "exit_timeout", same, api_default(serve, "exit_timeout")),
        ("triton-repo", "delay_ms", lambda ms: round(ms * 1000), DEPLOY_DELAY_US),
        ("triton-repo", "delay_ms", lambda ms: round(ms * 1000), api_default(write_triton_repo, "delay_us")),
        ("triton-repo", "instances", same, api_default(write_triton_repo, "instances")),
    ]


def test_every_command_line_default_is_the_api_default():
    wrong = [f"{command} --{option.replace('_', '-')}: {convert(cli_default(command, option))!r} != {want!r}"
             for command, option, convert, want in pairs() if convert(cli_default(command, option)) != want]
    assert not wrong, wrong


def test_the_pairs_are_read_from_the_commands():
    """A renamed option or command is an error here, not a pair silently skipped."""
    with pytest.raises(KeyError):
        cli_default("exprot", "opset")
    with pytest.raises(ValueError):
        cli_default("export", "no_such_option")
    assert isinstance(main.commands["export"], click.Command)
