"""distill: the losses do what they say, checkpoints resume bit-identically, incubation trains one level at a time,
GRI attention equals its definition and exports, a folder of images is data, bad inputs are one line."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from asdm_export.assembly.assemble import assemble
from asdm_export.cli.group import main
from asdm_export.distill import DistillRecipe, distill
from asdm_export.distill.distill import Interrupted, checkpoint_dir
from asdm_export.distill.losses import (AttentionScores, feat_loss, min_snr_weight, parse_losses, sas_loss,
                                       task_target)
from asdm_export.errors import InputError
from asdm_export.models.gri import gri_attention
from asdm_export.models.loading import resolve_model

TEACHER = "asdm:tiny"
SHORT = dict(batch=4, checkpoint_every=100, lr=1e-3, warmup_steps=1)


def cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_dir):
    """bk-small from asdm:tiny with timestep-routed ME-CondConv (K=2): experts, gates and routers all train."""
    out = tmp_path_factory.mktemp("distill") / "student"
    assemble(TEACHER, "bk-small", out, experts=2, router="timestep")
    return out


def kd_on_fixed_batch(student_unet, teacher_unet, seed=123):
    """``|eps_s - eps_t|^2`` on one batch the training never drew (other seed), t spread over the schedule."""
    g = torch.Generator().manual_seed(seed)
    cfg = teacher_unet.config
    x = torch.randn(8, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.linspace(50, 950, 8).long()
    emb = torch.randn(8, 77, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(student_unet(x, t, emb).sample, teacher_unet(x, t, emb).sample).item()


def test_short_distillation_lowers_kd_and_interrupted_runs_resume_bit_identically(student, tmp_path, monkeypatch):
    recipe = DistillRecipe(losses=parse_losses("kd,feat,sas"), steps=30, **SHORT)
    kw = dict(recipe=recipe, images=64, progress=False)
    whole = distill(TEACHER, student, tmp_path / "whole", **kw)
    assert whole["kind"] == "student-pipeline" and whole["steps"] == 30
    assert not checkpoint_dir(tmp_path / "whole").exists()  # the checkpoint became the output

    teacher = resolve_model(TEACHER).load_unet()
    before = kd_on_fixed_batch(resolve_model(student).load_unet(), teacher)
    after = kd_on_fixed_batch(resolve_model(tmp_path / "whole").load_unet(), teacher)
    assert after < 0.5 * before, (before, after)

    # Ctrl-C at step 11: the checkpoint holds step 11, the error says so, --resume ends on the same weights
    from asdm_export.distill import train as train_mod

    original = train_mod.Trainer.train_step

    def interrupt_at_11(self):
        if self.step == 11:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(train_mod.Trainer, "train_step", interrupt_at_11)
    with pytest.raises(Interrupted, match="step 11/30.*--resume") as err:
        distill(TEACHER, student, tmp_path / "cut", **kw)
    assert err.value.exit_code == 130
    assert not (tmp_path / "cut").exists()
    ckpt = checkpoint_dir(tmp_path / "cut")
    assert json.loads((ckpt / "train_state.json").read_text())["step"] == 11
    monkeypatch.setattr(train_mod.Trainer, "train_step", original)
    # the checkpoint is a usable model as it stands (EMA weights at step 11)
    assert resolve_model(ckpt).load_unet() is not None
    # without --resume the checkpoint is not silently discarded
    with pytest.raises(InputError, match="--resume"):
        distill(TEACHER, student, tmp_path / "cut", **kw)
    distill(TEACHER, student, tmp_path / "cut", resume=True, **kw)
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    log = (tmp_path / "cut" / "distill.log").read_text()
    assert "stopped at step 11" in log and "resumed at step 11" in log
    record = json.loads((tmp_path / "cut" / "distill.json").read_text())
    assert [h["step"] for h in record["history"]] == [30]
    # the logged running means cover the steps before the stop too: the same numbers as the whole run's
    assert record["history"] == json.loads((tmp_path / "whole" / "distill.json").read_text())["history"]

    # a second Ctrl-C lands inside step 13, after the optimizer moved the weights: that half step is not
    # saved as a step (the checkpoint keeps step 10), and --resume still ends on the whole run's weights
    every10 = dict(kw, recipe=DistillRecipe(losses=parse_losses("kd,feat,sas"), steps=30,
                                            **dict(SHORT, checkpoint_every=10)))

    def interrupt_inside_step_13(self):
        if self.step == 12:
            real = self.opt.step

            def step_then_stop(*args, **kwargs):
                real(*args, **kwargs)
                raise KeyboardInterrupt

            self.opt.step = step_then_stop
        return original(self)

    monkeypatch.setattr(train_mod.Trainer, "train_step", interrupt_inside_step_13)
    with pytest.raises(Interrupted, match="step 12/30.*holds step 10"):
        distill(TEACHER, student, tmp_path / "mid", **every10)
    assert json.loads((checkpoint_dir(tmp_path / "mid") / "train_state.json").read_text())["step"] == 10
    monkeypatch.setattr(train_mod.Trainer, "train_step", original)
    distill(TEACHER, student, tmp_path / "mid", resume=True, **every10)
    c = weights(tmp_path / "mid")
    assert max((a[k] - c[k]).abs().max().item() for k in a) == 0.0


@pytest.mark.parametrize("error", ["EIO", "EPIPE"])  # a terminal that closed; a pipe whose reader went away
def test_a_terminal_that_goes_away_ends_the_showing_not_the_training(student, tmp_path, monkeypatch, error):
    """The terminal closes: SIGHUP, and the progress bar's next write fails (EIO). That error ended training
    before the signal's stop-time checkpoint, losing the steps since the last save. The signal now stops at the
    step's end with that step saved; without a signal (a disowned job) training goes on to the end. A closed
    pipe's EPIPE inside tqdm's refresh kept tqdm's write lock (up to tqdm 4.67 its monitor thread then waited
    for it at exit, and the finished run never ended): the bar's stream takes the error, tqdm never sees it."""
    import errno
    import importlib
    import io
    import threading

    from tqdm import tqdm

    from asdm_export.distill import train as train_mod

    distill_mod = importlib.import_module("asdm_export.distill.distill")  # the package's `distill` is the function

    class Terminal(io.StringIO):
        gone = False

        def write(self, text):
            if self.gone:
                raise OSError(getattr(errno, error), error)
            return super().write(text)

    stoppers, original = [], train_mod.Trainer.train_step

    class Watched(distill_mod._StepBoundary):
        def __enter__(self):
            stoppers.append(self)
            return super().__enter__()

    def closes_at_5(signals):
        def train_step(self):
            if self.step == 5:
                terminal.gone = True
                if signals:  # as the kernel's SIGHUP would, without sending one to the test's process
                    stoppers[-1]._handler(signal.SIGHUP, None)
            return original(self)
        return train_step

    def echo(line):
        terminal.write(line + "\n")

    def lock_is_free():  # asked from another thread: tqdm's locks are re-entrant for the one that holds them
        free = []

        def ask():
            locks = tqdm.get_lock().locks
            taken = [lock for lock in locks if lock.acquire(False)]
            for lock in taken:
                lock.release()
            free.append(len(taken) == len(locks))

        thread = threading.Thread(target=ask)
        thread.start()
        thread.join()
        return free == [True]

    real_bar = distill_mod._bar
    monkeypatch.setattr(distill_mod, "_StepBoundary", Watched)
    monkeypatch.setattr(distill_mod, "_bar", lambda trainer, progress, stream: real_bar(
        trainer, progress, stream, mininterval=0, miniters=1))  # a refresh at every step
    kw = dict(recipe=DistillRecipe(steps=12, **SHORT), images=16, progress=True, echo=echo)

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(train_mod.Trainer, "train_step", closes_at_5(signals=True))
    with pytest.raises(Interrupted, match="hung up.*step 6/12.*holds step 6") as err:
        distill(TEACHER, student, tmp_path / "hup", **kw)
    assert err.value.exit_code == 129
    assert json.loads((checkpoint_dir(tmp_path / "hup") / "train_state.json").read_text())["step"] == 6
    assert lock_is_free()

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(train_mod.Trainer, "train_step", closes_at_5(signals=False))
    assert distill(TEACHER, student, tmp_path / "disowned", **kw)["steps"] == 12
    assert f"progress no longer shown at step 6 ([Errno {getattr(errno, error)}]" in \
        (tmp_path / "disowned" / "distill.log").read_text()
    assert lock_is_free()


def test_distilled_student_is_a_model_export_check_and_reparam_take(student, tmp_path):
    out = tmp_path / "d"
    distill(TEACHER, student, out, recipe=DistillRecipe(steps=4, **SHORT), images=16, progress=False,
            save_dtype="fp16")
    spec = json.loads((out / "unet" / "asdm_student.json").read_text())
    assert spec["distill"]["steps"] == 4 and spec["plan"]["name"] == "bk-small"
    assert {p.name for p in out.iterdir()} >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                               "model_index.json", "distill.json", "distill.log", "manifest.json"}
    assert weights(out)["conv_in.weight"].dtype == torch.float16
    r = cli("export", "--model", out, "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    r = cli("check", "--bundle", tmp_path / "b", "--no-e2e")  # per graph: ORT vs the student's PyTorch module
    assert r.exit_code == 0, r.output
    r = cli("reparam", "--model", out, "--bands", "0:500:1000", "--out", tmp_path / "bands")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "bands" / "band-0000-0500" / "asdm_student.json").is_file()


def test_progressive_incubation_trains_one_level_inside_the_teacher(student, tmp_path):
    """After the first incubation phase only the innermost level (down_blocks.3 + up_blocks.0) has changed."""
    recipe = DistillRecipe(steps=2, incubate_steps=2, **SHORT)
    record = distill(TEACHER, student, tmp_path / "inc", recipe=recipe, images=16, progress=False, stop_at=2)
    assert [p["name"] for p in record["phases"]] == [
        "incubate down_blocks.3 + up_blocks.0", "incubate down_blocks.2 + up_blocks.1",
        "incubate down_blocks.1 + up_blocks.2", "incubate down_blocks.0 + up_blocks.3", "end-to-end"]
    state = load_file(str(checkpoint_dir(tmp_path / "inc") / "train_state.safetensors"))
    start = resolve_model(student).load_unet().state_dict()
    changed = {k for k, v in start.items() if not torch.equal(state[f"student.{k}"], v)}
    assert changed, "the first level did not train"
    assert all(k.startswith(("down_blocks.3.", "up_blocks.0.")) for k in changed), sorted(changed)[:5]
    assert any(k.startswith("down_blocks.3.") for k in changed) and any(k.startswith("up_blocks.0.") for k in changed)
    # a stop between the two renames of a checkpoint save leaves the checkpoint moved aside: --resume finds it
    aside = tmp_path / ".inc.checkpoint.old-x1"
    aside.mkdir()
    checkpoint_dir(tmp_path / "inc").replace(aside / "x")
    # the second phase runs with level 3 still inside the teacher, and changes only level 2
    distill(TEACHER, student, tmp_path / "inc", recipe=recipe, images=16, progress=False, resume=True, stop_at=4)
    assert not aside.exists()
    assert json.loads((checkpoint_dir(tmp_path / "inc") / "train_state.json").read_text())["step"] == 4
    later = load_file(str(checkpoint_dir(tmp_path / "inc") / "train_state.safetensors"))
    changed = {k for k in start if not torch.equal(later[f"student.{k}"], state[f"student.{k}"])}
    assert changed and all(k.startswith(("down_blocks.2.", "up_blocks.1.")) for k in changed), sorted(changed)[:5]


def test_sas_is_the_kl_of_the_attention_distributions():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(6, 10, 7, generator=g), torch.randn(6, 10, 7, generator=g)
    p, q = t.softmax(-1).double(), s.softmax(-1).double()
    expected = (p * (p / q).log()).sum(-1).mean().item()
    got = sas_loss({"s": s}, {"t": t}, [("s", "t")]).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert sas_loss({"s": t}, {"t": t}, [("s", "t")]).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_kd_is_bk_sdms_sum_over_stages():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    got = feat_loss({"s1": a, "s2": a}, {"t1": b, "t2": 2 * b}, [("s1", "t1"), ("s2", "t2")])
    assert got.item() == pytest.approx(1.0 + 4.0, abs=1e-6)  # the per-stage means summed, not averaged


def test_the_attention_the_sas_term_records_is_diffusers_attention():
    """While recording scores the cross-attention still computes what diffusers' processor does, and the scores
    are ``Q K^T / sqrt(d)`` per head."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16).eval()
    x, context = torch.randn(3, 10, 32), torch.randn(3, 7, 16)
    with torch.no_grad():
        model.attn.set_processor(AttnProcessor())
        expected = model.attn(x, encoder_hidden_states=context)
        with AttentionScores(model, ["attn"]) as recorded:
            got = model.attn(x, encoder_hidden_states=context)
            scores = recorded.values["attn"]
        q = model.attn.to_q(x).view(3, 10, 2, 16).permute(0, 2, 1, 3).reshape(6, 10, 16)
        k = model.attn.to_k(context).view(3, 7, 2, 16).permute(0, 2, 1, 3).reshape(6, 7, 16)
    assert float((got - expected).norm() / expected.norm()) < 1e-6
    assert (scores - q @ k.transpose(1, 2) / 4.0).abs().max().item() < 1e-5
    assert isinstance(model.attn.processor, AttnProcessor)  # put back


def test_task_target_and_weight_follow_the_teachers_prediction_type():
    """A v-prediction teacher's students learn the velocity (diffusers' definition), weighted so that both
    targets put Min-SNR-gamma on the implied x0 error."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    z0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 300, 600, 990])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = task_target("v_prediction", z0, noise, a)
    assert (v - sched.get_velocity(z0, noise, t)).abs().max().item() < 1e-6
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    assert (a.sqrt() * zt - (1 - a).sqrt() * v - z0).abs().max().item() < 1e-5  # v gives x0 back
    assert task_target("epsilon", z0, noise, a) is noise
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    for kind, scale in (("epsilon", snr), ("v_prediction", snr + 1)):
        w = min_snr_weight(sched.alphas_cumprod, 5.0, kind)
        assert torch.allclose(w * scale, torch.clamp(snr, max=5.0), rtol=1e-6)
    with pytest.raises(InputError, match="predicts 'sample'"):
        task_target("sample", z0, noise, a)


def test_folder_data_in_diffusers_metadata_convention(student, tmp_path):
    from PIL import Image

    from asdm_export.toyworld import world

    data = tmp_path / "imgs"
    data.mkdir()
    lines = []
    for i in range(6):
        image, colour, shape = world.sample(3, i)
        Image.fromarray(image).resize((96, 80)).save(data / f"{i:03d}.png")  # not square, not the VAE's size
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": world.caption(colour, shape)}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    said = []
    record = distill(TEACHER, student, tmp_path / "f", recipe=DistillRecipe(steps=3, **SHORT), data=str(data),
                     progress=False, echo=said.append)
    assert record["data"]["kind"] == "folder" and record["data"]["images"] == 6
    # the encoding (minutes for a real folder, before any step) is said before it starts
    assert said[0] == f"encoding 6 training images of '{data.resolve()}' with the teacher's VAE"


def test_a_teacher_with_more_parts_gives_a_student_pipeline_that_loads(tiny_dir, tmp_path):
    """SD checkpoints name a feature extractor (and a safety checker) in model_index.json: the student pipeline
    holds every part its index names, through checkpoint re-saves and the final output, and loads."""
    from transformers import CLIPImageProcessor

    teacher = shutil.copytree(tiny_dir, tmp_path / "teacher")
    CLIPImageProcessor().save_pretrained(teacher / "feature_extractor")
    index = json.loads((teacher / "model_index.json").read_text())
    (teacher / "model_index.json").write_text(json.dumps({**index, "feature_extractor": ["transformers",
                                                                                        "CLIPImageProcessor"]}))
    student = tmp_path / "student"
    assemble(str(teacher), "bk-small", student, experts=2)
    distill(str(teacher), student, tmp_path / "out", recipe=DistillRecipe(steps=3, **{**SHORT, "checkpoint_every": 1}),
            images=8, progress=False)
    out = tmp_path / "out"
    assert resolve_model(out).load_pipeline().feature_extractor is not None
    for rel in ("feature_extractor/preprocessor_config.json", "model_index.json", "vae/config.json"):
        assert (out / rel).read_bytes() == (teacher / rel).read_bytes(), rel
    assert not checkpoint_dir(out).exists()


def test_a_corrupt_checkpoint_is_one_line(tmp_path):
    """safetensors' own error type (not an OSError or ValueError) still says what is wrong and what to do."""
    from asdm_export.distill.distill import STATE_JSON, STATE_TENSORS, read_checkpoint

    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / STATE_JSON).write_text("{}")
    (folder / STATE_TENSORS).write_bytes(b"garbage!garbage!")
    with pytest.raises(InputError, match="is incomplete or corrupt .*; start over with --overwrite"):
        read_checkpoint(folder, {})
    # readable files with a wrong value in them: a TypeError at the resume before
    from safetensors.torch import save_file

    save_file({"rng": torch.zeros(2, dtype=torch.uint8)}, str(folder / STATE_TENSORS))
    for state, needle in (({"step": "x", "history": []}, "step is not int"), ({"step": 3}, "history is missing"),
                          ({"step": -1, "history": []}, "step is negative"), ([], "it is not a mapping")):
        (folder / STATE_JSON).write_text(json.dumps(state))
        with pytest.raises(InputError, match=f"is damaged \\({needle}\\); start over with --overwrite"):
            read_checkpoint(folder, {})


def test_training_that_diverges_stops_and_a_checkpoint_changed_in_place_is_refused(student, tmp_path):
    """A learning rate far too high: the loss turned NaN at step 3, training went on, and the student written (exit 0)
    held NaN weights only. Now the step that would apply it stops the run (exit 5), and nothing is written. A
    checkpoint whose bytes were overwritten in place (same size) loaded as other numbers, NaN EMA weights
    among them, and --resume carried them into the result."""
    from asdm_export.distill.distill import STATE_TENSORS
    from asdm_export.errors import StageError

    wild = DistillRecipe(losses=parse_losses("kd,feat"), steps=6, **dict(SHORT, lr=1e4))
    with pytest.raises(StageError, match=r"training diverged at step \d/6 \(end-to-end: loss nan.*lower --lr") as err:
        distill(TEACHER, student, tmp_path / "wild", recipe=wild, images=16, progress=False)
    assert err.value.exit_code == 5 and not (tmp_path / "wild").exists()

    kw = dict(recipe=DistillRecipe(losses=parse_losses("kd"), steps=4, **dict(SHORT, checkpoint_every=2)), images=16,
              progress=False)
    distill(TEACHER, student, tmp_path / "cut", stop_at=2, **kw)
    state = checkpoint_dir(tmp_path / "cut") / STATE_TENSORS
    data = bytearray(state.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    state.write_bytes(bytes(data))
    with pytest.raises(InputError, match="is damaged \\(train_state.safetensors changed since it was saved\\)"):
        distill(TEACHER, student, tmp_path / "cut", resume=True, **kw)
    assert not (tmp_path / "cut").exists()


def test_gri_attention_equals_its_definition():
    """Each query attends to its window's keys plus the pooled cell means' keys: a loop over windows and queries."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).double().eval()
    b, h, w, window, pool = 2, 8, 12, 4, 2
    x = torch.randn(b, h * w, 16, dtype=torch.float64)
    got = gri_attention(attn, x, (h, w), window, pool)

    grid = x.reshape(b, h, w, 16)
    cells = grid.reshape(b, pool, h // pool, pool, w // pool, 16).mean((2, 4)).reshape(b, pool * pool, 16)
    out = torch.empty(b, h * w, 16, dtype=torch.float64)
    for bi in range(b):
        for y in range(h):
            for xx in range(w):
                y0, x0 = (y // window) * window, (xx // window) * window
                region = grid[bi, y0:y0 + window, x0:x0 + window].reshape(-1, 16)
                keys_in = torch.cat([region, cells[bi]])
                q = attn.to_q(grid[bi, y, xx][None]).reshape(2, 8)
                k = attn.to_k(keys_in).reshape(-1, 2, 8)
                v = attn.to_v(keys_in).reshape(-1, 2, 8)
                probs = torch.einsum("hd,thd->ht", q, k).mul(8 ** -0.5).softmax(-1)
                out[bi, y * w + xx] = torch.einsum("ht,thd->hd", probs, v).reshape(16)
    expected = attn.to_out[0](out)
    assert (got - expected).abs().max().item() < 1e-10


def test_gri_student_exports_matches_pytorch_on_ort_and_passes_lint(tmp_path, tiny_dir):
    s = tmp_path / "gri"
    manifest = assemble(TEACHER, "bk-small", s, experts=1, gri={"stages": ["down_blocks.0", "up_blocks.3"],
                                                                 "window": 4, "pool": 4})
    assert manifest["gri"]["layers"] == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1",
                                         "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
                                         "up_blocks.3.attentions.1.transformer_blocks.0.attn1"]
    unet = resolve_model(s).load_unet()
    assert type(unet.get_submodule(manifest["gri"]["layers"][0]).processor).__name__ == "GRIAttnProcessor"
    r = cli("export", "--model", TEACHER, "--unet", f"unet={s}", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    r = cli("check", "--bundle", tmp_path / "b", "--no-e2e")  # per graph: ORT vs the GRI module, random inputs
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "b-check" / "report.json").read_text())
    assert report["passed"] and [g["passed"] for g in report["graphs"] if g["name"] == "unet"] == [True]
    r = cli("lint", tmp_path / "b")
    assert r.exit_code == 0, r.output
    # the GRI layers changed the function: the full-attention student differs
    plain = tmp_path / "plain"
    assemble(TEACHER, "bk-small", plain, experts=1)
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        a = unet(x, torch.tensor([500]), emb).sample
        b = resolve_model(plain).load_unet()(x, torch.tensor([500]), emb).sample
    assert (a - b).abs().max().item() > 1e-4


def test_gri_export_refuses_latents_its_grids_cannot_split(tmp_path, tiny_dir):
    """A GRI layer on a half-resolution stage with window 8 needs latents in multiples of 16: export says so
    before tracing (exit 2, nothing written), and its default range holds only such sizes."""
    s = tmp_path / "gri"
    assemble(TEACHER, "bk-small", s, experts=1, gri={"stages": ["down_blocks.1"], "window": 8, "pool": 8})
    r = cli("export", "--model", TEACHER, "--unet", f"unet={s}", "--unet-only", "--latent", "8:16:24",
            "--out", tmp_path / "b")
    assert r.exit_code == 2, r.output
    assert "multiples of 16, got 8" in r.output and "GRI layer 'down_blocks.1." in r.output
    assert not (tmp_path / "b").exists()
    from asdm_export.graphs import default_latent_range

    assert default_latent_range(resolve_model(s).load_unet()) == (16, 16, 32)


def test_gri_refuses_grids_it_cannot_split(tmp_path, tiny_dir):
    r = cli("assemble", "--model", TEACHER, "--plan", "bk-small", "--gri", "down_blocks.0", "--gri-window", "5",
            "--out", tmp_path / "s")
    assert r.exit_code == 2 and "window 5" in r.output and not (tmp_path / "s").exists()
    r = cli("assemble", "--model", TEACHER, "--plan", "bk-small", "--gri", "down_blocks.9", "--out", tmp_path / "s")
    assert r.exit_code == 2 and "names no self-attention" in r.output


@pytest.mark.parametrize("case", ["other-teacher", "unknown-loss", "loss-twice", "infinite-weight", "infinite-lr",
                                  "empty-folder", "no-metadata", "binary-metadata", "not-a-student", "sample-teacher"])
def test_bad_inputs_are_one_line_exit_2_and_write_nothing(case, student, tmp_path, tiny_dir):
    args = ["distill", "--teacher", TEACHER, "--student", student, "--steps", "2", "--batch", "2",
            "--out", tmp_path / "out"]
    expect = {"other-teacher": "not assembled from teacher", "unknown-loss": "unknown loss 'foo'",
              "loss-twice": "--losses names 'task' twice",
              "infinite-weight": "loss weight 'kd=inf' must be a positive number",
              "infinite-lr": "'inf' is not a finite number",
              "empty-folder": "empty metadata.jsonl", "no-metadata": "has no metadata.jsonl",
              "binary-metadata": "metadata.jsonl is not UTF-8 text", "not-a-student": "not an assembled student",
              "sample-teacher": "the teacher predicts 'sample'; the task loss trains epsilon or v_prediction"}[case]
    if case == "other-teacher":
        args[2] = "asdm:toyworld"
    elif case == "unknown-loss":
        args += ["--losses", "task,foo"]
    elif case == "loss-twice":  # the last weight won: not twice the task term
        args += ["--losses", "task,kd,task=2"]
    elif case == "infinite-weight":
        args += ["--losses", "task,kd=inf"]
    elif case == "infinite-lr":
        args += ["--lr", "inf"]
    elif case in ("empty-folder", "no-metadata", "binary-metadata"):
        folder = tmp_path / "data"
        folder.mkdir()
        if case == "empty-folder":
            (folder / "metadata.jsonl").write_text("\n")
        elif case == "binary-metadata":
            (folder / "metadata.jsonl").write_bytes(bytes(range(128, 256)))
        args += ["--data", folder]
    elif case == "sample-teacher":  # the same UNet, a scheduler that reads its output as x0
        teacher = tmp_path / "teacher"
        shutil.copytree(tiny_dir, teacher)
        config = teacher / "scheduler" / "scheduler_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "sample"}))
        args[2] = teacher
        args[4] = tmp_path / "student"
        assemble(str(teacher), "bk-small", args[4])
    else:
        args[4] = TEACHER
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert expect in r.output and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not checkpoint_dir(tmp_path / "out").exists()


def _training_process(student, out: Path, steps: int, sigint):
    """``distill`` on the command line, in a process of its own whose SIGINT is ``sigint`` (a terminal's
    foreground job has the default; a script's background job, ``cmd &``, is started with it ignored, and so is
    this test's runner where it runs in one); returned 2 s into training, with its command and environment."""
    cmd = [sys.executable, "-m", "asdm_export.cli", "distill", "--teacher", TEACHER, "--student", str(student),
           "--steps", str(steps), "--batch", "2", "--images", "16", "--checkpoint-every", "1000", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))
    log = checkpoint_dir(out) / "distill.log"
    deadline = time.monotonic() + 120
    while not log.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # some steps in
    return cmd, env, proc


def test_ctrl_c_on_the_command_line_keeps_a_whole_step_and_resume_finishes(student, tmp_path):
    out = tmp_path / "sig"
    cmd, env, proc = _training_process(student, out, 150, signal.SIG_DFL)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    step = json.loads((checkpoint_dir(out) / "train_state.json").read_text())["step"]
    assert 0 < step < 150 and not out.exists()
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"stopped at step {step}" in (out / "distill.log").read_text()
    assert json.loads((out / "distill.json").read_text())["step"] == 150


def test_a_background_run_keeps_training_through_ctrl_c_and_stops_on_sigterm(student, tmp_path):
    """`asdm-export distill ... &` in a script: the job starts with SIGINT ignored, so a Ctrl-C meant for the
    script must not stop it, as it stops no other command (distill took SIGINT whatever its disposition);
    SIGTERM still stops it at a whole step, saved."""
    out = tmp_path / "bg"
    _, _, proc = _training_process(student, out, 3000, signal.SIG_IGN)
    try:
        proc.send_signal(signal.SIGINT)
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM) at step" in err and "Traceback" not in err
    step = json.loads((checkpoint_dir(out) / "train_state.json").read_text())["step"]
    assert 0 < step < 3000 and f"stopped at step {step}" in (checkpoint_dir(out) / "distill.log").read_text()


def test_the_shipped_distilled_student_draws_what_it_is_asked():
    """asdm:toyworld-bk-small (shipped, fp16) against the undistilled bk-small's 0.047 both-correct (RESULTS.md):
    48 samples, so 0.80 sits 4 standard errors below its measured 0.965 and 19 above 0.047."""
    from asdm_export.models.presets import SHIPPED_ROOT, materialize
    from asdm_export.toyworld.judge import load_judge
    from asdm_export.toyworld.quality import QualitySettings, measure_quality

    folder = materialize("asdm:toyworld-bk-small")
    spec = json.loads((folder / "unet" / "asdm_student.json").read_text())
    assert spec["plan"]["name"] == "bk-small" and spec["distill"]["steps"] == 2400
    assert (folder / "vae").is_dir() and (folder / "text_encoder").is_dir()  # joined with the teacher's parts
    r = measure_quality(load_judge(SHIPPED_ROOT / "judge"), QualitySettings(samples=48, steps=20, guidance=5.0),
                        model="asdm:toyworld-bk-small")
    assert r["both"]["accuracy"] >= 0.80, r["both"]


def test_toy_world_latents_are_encoded_once_then_read_from_the_cache(model_cache, monkeypatch):
    from asdm_export.distill import data

    source = data.describe_source("toyworld", 8)
    teacher = resolve_model(TEACHER)
    vae = teacher.load_pipeline().vae
    first = data.cached_latents(vae, source, 128, teacher.sha256, model_cache)
    assert list((model_cache / "latents").glob("toyworld-*.safetensors"))

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded again")

    monkeypatch.setattr(data, "encode", no_encoding)
    again = data.cached_latents(vae, source, 128, teacher.sha256, model_cache)
    assert torch.equal(first.mean, again.mean) and torch.equal(first.std, again.std)
    assert torch.equal(first.caption, again.caption) and first.prompts == again.prompts
    # another teacher (or data) is another entry, encoded afresh
    with pytest.raises(AssertionError, match="encoded again"):
        data.cached_latents(vae, source, 128, "0" * 64, model_cache)
    # a damaged entry (safetensors raises its own error type) is encoded again, not a traceback
    for entry in (model_cache / "latents").glob("toyworld-*.safetensors"):
        entry.write_bytes(b"garbage!garbage!")
    with pytest.raises(AssertionError, match="encoded again"):
        data.cached_latents(vae, source, 128, teacher.sha256, model_cache)


@pytest.mark.parametrize("failure", ["read-only", "full"])
def test_latents_a_cache_cannot_keep_are_trained_on_and_said(model_cache, tmp_path, monkeypatch, failure):
    """A cache that cannot be written (read-only) or that fills was an internal error after minutes of encoding;
    the latents are kept in memory for this run, a line says so, and no temporary file stays."""
    import errno

    from safetensors.torch import save_file

    from asdm_export.distill import data

    source = data.describe_source("toyworld", 8)
    teacher = resolve_model(TEACHER)
    vae = teacher.load_pipeline().vae
    reference = data.cached_latents(vae, source, 128, teacher.sha256, model_cache)
    if failure == "read-only":
        (tmp_path / "file").write_text("")
        cache = tmp_path / "file" / "cache"
    else:
        cache = tmp_path / "cache"

        def full(tensors, filename, **kw):
            save_file({"x": torch.zeros(1)}, filename)  # part of it written, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr("safetensors.torch.save_file", full)
    said = []
    latents = data.cached_latents(vae, source, 128, teacher.sha256, cache, say=said.append)
    assert torch.equal(latents.mean, reference.mean) and latents.prompts == reference.prompts
    assert "the latents could not be kept in" in said[-1] and "ASDM_EXPORT_CACHE" in said[-1], said
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("toyworld-*"))


def test_a_folder_is_read_and_encoded_a_few_images_at_a_time(tmp_path, monkeypatch):
    """At SD's 512 px the VAE encoder takes ~0.6 GB per image (a batch of 256: ~160 GB): batches shrink with the
    pixel count, and a folder's images are read, and made float, only as their batch is encoded."""
    import types

    from PIL import Image

    from asdm_export.distill import data

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (40, 32), (25 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "red"}) + "\n"
                                                   for i in range(10)))
    read, seen = [], []
    load = data._load_image
    monkeypatch.setattr(data, "_load_image", lambda path, size: read.append(path) or load(path, size))

    class VAE:
        config = types.SimpleNamespace(scaling_factor=0.5)

        def encode(self, x):
            seen.append((tuple(x.shape), x.dtype, len(read)))
            mean = x[:, :1, ::8, ::8].repeat(1, 4, 1, 1)
            return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=mean, std=mean.abs() + 1))

    source = data.describe_source(str(folder), 10)
    images, captions = data.load_images(source, 512)
    assert not read  # nothing is read before it is encoded
    latents = data.encode(VAE(), images, captions, source, 512)
    assert [shape for shape, _, _ in seen] == [(4, 3, 512, 512), (4, 3, 512, 512), (2, 3, 512, 512)]
    assert [n for _, _, n in seen] == [4, 8, 10] and seen[0][1] == torch.float32
    assert latents.mean.shape == (10, 4, 64, 64) and float(latents.mean[9, 0, 0, 0]) == pytest.approx(
        0.5 * (225 / 127.5 - 1))  # image 9, red channel, times the scaling factor
    assert data.images_per_batch(64) == 256 and data.images_per_batch(128) == 64


def test_feature_kd_compares_outputs_of_the_same_shape_when_stages_are_dropped():
    """bk-tiny's innermost kept down stage loses its downsampler: its output is compared with the teacher
    stage's before downsampling (its last layer), so every pair of tapped features has one shape."""
    from asdm_export.assembly import build_student
    from asdm_export.assembly.plans import load_plan, resolve_plan
    from asdm_export.distill.losses import Taps, stage_pairs

    teacher = resolve_model("asdm:toyworld").load_unet()
    student, _ = build_student(teacher, "bk-tiny", experts=1)
    pairs = stage_pairs(resolve_plan(load_plan("bk-tiny"), dict(teacher.config)))
    assert ("down_blocks.2", "down_blocks.2.attentions.1") in pairs and ("up_blocks.0", "up_blocks.1") in pairs
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([100.0, 900.0]), torch.randn(2, 16, 64)
    with torch.no_grad(), Taps(student, [s for s, _ in pairs]) as s_taps, Taps(teacher, [t for _, t in pairs]) as t_taps:
        student(x, t, text)
        teacher(x, t, text)
        for s_name, t_name in pairs:
            assert s_taps.values[s_name].shape == t_taps.values[t_name].shape, (s_name, t_name)


def test_the_progress_stream_is_cleared_for_a_line_and_takes_write_errors(monkeypatch):
    """tqdm.write clears the bars that draw on sys.stderr before it writes a line: the bar's stream must compare
    equal to the stream it wraps, or the losses every 50 steps were glued onto the bar's line."""
    import importlib
    import io
    import re

    from tqdm import tqdm

    distill_mod = importlib.import_module("asdm_export.distill.distill")
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    bar = tqdm(total=3, file=distill_mod._ProgressStream(sys.stderr), mininterval=0, miniters=1, ncols=40)
    bar.update(1)
    tqdm.write("step 1/3 loss 0.5", file=sys.stderr)
    bar.close()
    # the bar's line blanked (then the cursor back up where another bar of this process sits below), then the line
    assert re.search(r"\r {40}\r(\x1b\[A)*step 1/3 loss 0\.5\n", terminal.getvalue()), repr(terminal.getvalue())

    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    stream = distill_mod._ProgressStream(Closed())
    assert stream.write("x") == 1 and isinstance(stream.error, BrokenPipeError)
    import copy

    copy.copy(stream)  # __getattr__ before __init__ (copy, pickle): an AttributeError, not a recursion


def test_distill_refuses_pickled_weights_without_offering_an_option_it_lacks(student, tmp_path):
    ckpt = tmp_path / "teacher.ckpt"
    ckpt.write_bytes(b"PK")
    with pytest.raises(InputError, match=r"convert them to safetensors \(this command reads safetensors only\)$"):
        distill(ckpt, student, tmp_path / "out", recipe=DistillRecipe(steps=1, **SHORT), images=4, progress=False)
    r = cli("distill", "--teacher", ckpt, "--student", student, "--out", tmp_path / "out")
    assert r.exit_code == 2 and "--allow-pickle" not in r.output, r.output
