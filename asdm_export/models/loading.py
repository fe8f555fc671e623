"""Resolve ``--model`` to a model source and load its components with diffusers.

Accepted sources:
  * ``asdm:<preset>``: an embedded model, written once to the cache and then read like any folder;
  * a diffusers pipeline folder (``model_index.json``) or a UNet folder (``config.json``);
  * a single-file checkpoint (``.safetensors``; ``.ckpt`` / ``.bin`` only with ``allow_pickle``),
    loaded through diffusers' single-file loaders (``config`` names the diffusers config to use);
  * a Hugging Face Hub id, downloaded with ``huggingface_hub`` when online.

Pickled weights are refused unless the user asks for them: unpickling runs code from the file.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ..artifacts import hash_folder, sha256_file
from ..errors import MEMORY_ADVICE, FetchError, InputError, OutOfMemory, first_line, out_of_memory
from . import presets

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SUPPORTED_UNET = "UNet2DConditionModel"
STUDENT_FILE = "asdm_student.json"  # marks a student folder written by `asdm-export assemble` / `reparam`


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    files = [p for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    safe = [p for p in files if p.name.endswith((".safetensors", ".safetensors.index.json"))]
    pickled = [p for p in files if p.suffix in PICKLE_SUFFIXES or p.name.endswith(".bin.index.json")]
    return safe, pickled


@dataclass
class ModelSource:
    """Where a model comes from and how to load its parts."""

    spec: str
    kind: str  # "preset" | "pipeline" | "unet" | "single-file"
    path: Path
    allow_pickle: bool | None = False  # None: never, and the command has no --allow-pickle to offer
    config: str | None = None  # diffusers config for single-file checkpoints

    # ---- identity -------------------------------------------------------------------------------
    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.path) if self.path.is_file() else hash_folder(self.path)

    def describe(self) -> dict:
        return {"model": self.spec, "kind": self.kind, "path": str(self.path.resolve()), "sha256": self.sha256,
                **({"config": self.config} if self.config else {})}

    @staticmethod
    def reopen_spec(recorded: dict) -> str:
        """What to resolve to re-open a recorded model: presets and hub ids by name, local models by
        their absolute path (so a relative --model still works from another directory)."""
        if recorded["kind"] == "preset" or not Path(recorded["path"]).exists():
            return recorded["model"]
        return recorded["path"]

    @cached_property
    def has_pipeline(self) -> bool:
        """Whether the source holds text encoder, VAE, tokenizer and scheduler besides the UNet."""
        if self.kind == "single-file":
            return _ldm_parts(self.path) >= {"unet", "vae", "text_encoder"}
        return self.kind in ("preset", "pipeline")

    @property
    def unet_folder(self) -> Path | None:
        """The folder holding the UNet's config and weights; None for a single file."""
        if self.kind == "single-file":
            return None
        return self.path / "unet" if self.has_pipeline else self.path

    # ---- loading --------------------------------------------------------------------------------
    def load_unet(self):
        """The UNet in float32 on the CPU, in eval mode."""
        from diffusers import UNet2DConditionModel

        try:
            if self.kind == "single-file":
                unet = self._single_file_pipeline.unet if self.has_pipeline else self._single_file_unet()
            else:
                folder = self.unet_folder
                self._check_weights(folder)
                if (folder / "config.json").is_file():
                    read_unet_config(folder / "config.json")
                if (folder / STUDENT_FILE).is_file():  # assembled by asdm-export: may hold ME-CondConv layers
                    from .student import load_student

                    unet = load_student(folder)
                else:
                    unet = UNet2DConditionModel.from_pretrained(
                        str(folder), use_safetensors=None if self.allow_pickle else True
                    )
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise InputError(f"could not load the UNet from '{self.spec}': {load_failure(err)}") from err
        check_unet_supported(unet)
        return unet.float().eval()

    def load_pipeline(self):
        """The whole StableDiffusionPipeline (text encoder, VAE, tokenizer, scheduler, UNet)."""
        import torch
        from diffusers import StableDiffusionPipeline

        # float32 whatever the files hold (the toy world ships fp16): export decides precision later, and
        # fp16 matmuls are not supported on every CPU
        fp32 = {"torch_dtype": torch.float32}
        with _quiet_loading_bar():
            try:
                if self.kind == "single-file" and self.has_pipeline:
                    pipe = self._single_file_pipeline
                elif self.has_pipeline:
                    for part in ("unet", "text_encoder", "vae"):
                        self._check_weights(self.path / part)
                    # A student UNet (asdm_student.json) is loaded by us; diffusers would drop its experts.
                    student = {"unet": self.load_unet()} if (self.path / "unet" / STUDENT_FILE).is_file() else {}
                    pipe = StableDiffusionPipeline.from_pretrained(
                        str(self.path), use_safetensors=None if self.allow_pickle else True,
                        safety_checker=None, requires_safety_checker=False, **student, **fp32,
                    )
                else:
                    raise InputError(
                        f"'{self.spec}' is a UNet only; this step needs a whole pipeline "
                        "(a folder with model_index.json, a hub id, or a single-file checkpoint that also holds "
                        "the text encoder and VAE)"
                    )
            except (OSError, ValueError, RuntimeError, KeyError) as err:
                raise InputError(f"could not load the pipeline from '{self.spec}': {load_failure(err)}") from err
        check_unet_supported(pipe.unet)
        return pipe

    def _check_weights(self, folder: Path) -> None:
        if not folder.is_dir():
            raise InputError(f"'{self.spec}' has no '{folder.name}' folder")
        safe, pickled = _weight_files(folder)
        for path in safe:  # truncated or not safetensors at all: one line naming the file, before any loader
            _check_safetensors_header(path)
        if safe:
            return
        if pickled and not self.allow_pickle:
            raise InputError(pickle_refused(f"'{folder}' holds only pickled weights ({pickled[0].name})",
                                            offer=self.allow_pickle is not None))
        if not pickled:
            raise InputError(f"'{folder}' has no weight files (.safetensors)")

    @cached_property
    def _single_file_pipeline(self):
        """The whole pipeline of an original-layout checkpoint, loaded once (UNet, text encoder and VAE are
        all read from it). diffusers converts the keys; the configs, tokenizer and scheduler come from
        --config, or from the hub when diffusers can infer the model (SD1.5 / SD2 only, online only)."""
        import torch
        from diffusers import StableDiffusionPipeline

        try:
            return StableDiffusionPipeline.from_single_file(
                str(self.path), config=self.config, safety_checker=None, requires_safety_checker=False,
                torch_dtype=torch.float32,
            )
        except Exception as err:  # diffusers raises ValueError, OSError, hub errors and its own types here
            raise InputError(self._single_file_failure(err)) from err

    def _single_file_failure(self, err: BaseException) -> str:
        what = f"could not load '{self.path.name}' (original SD key layout): {load_failure(err)}"
        if self.config:
            return what
        return (what + "; pass --config with the diffusers pipeline folder (or asdm: preset, or hub id) whose "
                "configs describe this checkpoint: its sizes cannot be inferred from the file offline")

    def _single_file_unet(self):
        from diffusers import UNet2DConditionModel

        if "unet" in _ldm_parts(self.path):
            # Original (LDM) layout: diffusers converts the keys; the config comes from --config or the hub.
            try:
                return UNet2DConditionModel.from_single_file(str(self.path), config=self.config,
                                                             subfolder="unet" if self.config else None)
            except Exception as err:  # as above: diffusers' errors have no common type
                raise InputError(self._single_file_failure(err)) from err
        if not self.config:
            raise InputError(
                f"'{self.path.name}' is a UNet in diffusers layout; pass --config with the diffusers "
                "folder or hub id whose unet/config.json describes it"
            )
        return UNet2DConditionModel.from_single_file(str(self.path), config=self.config, subfolder="unet")


@contextlib.contextmanager
def _quiet_loading_bar():
    """diffusers draws a "Loading pipeline components" bar on stderr for every load; show it only with -v,
    and give the previous setting back (the Python API must not change the caller's diffusers state).
    Here rather than with the CLI's other library switches: diffusers has no environment variable for it,
    and importing it at start-up would cost every command seconds."""
    from diffusers.utils import logging as diffusers_logging

    was_on = diffusers_logging.is_progress_bar_enabled()
    if not logging.getLogger("asdm_export").isEnabledFor(logging.INFO):
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            diffusers_logging.enable_progress_bar()


LDM_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text_encoder": "cond_stage_model."}


def _ldm_parts(path: Path) -> set[str]:
    """Which pipeline parts a single file holds in the original (LDM) key layout: empty for a diffusers-layout
    UNet file."""
    if path.suffix != ".safetensors":
        return set(LDM_PREFIXES)  # pickled checkpoints of SD are whole LDM-layout pipelines in practice
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    return {part for part, prefix in LDM_PREFIXES.items() if any(k.startswith(prefix) for k in keys)}


def check_unet_config(config, where: Path | str) -> dict:
    """The keys of a UNet ``config.json`` that building the model and planning students read, checked for type
    and range: a hand-edited or damaged config is one line naming the key, not an error deep in diffusers."""
    from diffusers.models.unets import unet_2d_blocks

    if not isinstance(config, dict):
        raise InputError(f"'{where}' is not a UNet config (a JSON object); re-create it")

    def names(v):
        return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)

    def positive(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def ints(v, each=positive):
        return each(v) or (isinstance(v, list) and bool(v) and all(each(x) for x in v))

    def counts(v):  # a pruned stage may keep no layer
        return ints(v, lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0)

    rules = {  # key: (required, valid, what it must be)
        "down_block_types": (True, names, "a list of block names"),
        "up_block_types": (True, names, "a list of block names"),
        "block_out_channels": (True, lambda v: isinstance(v, list) and v and all(positive(x) for x in v),
                               "a list of positive integers"),
        "in_channels": (False, positive, "a positive integer"),
        "out_channels": (False, positive, "a positive integer"),
        "layers_per_block": (False, counts, "a count or a list of counts"),
        "cross_attention_dim": (False, ints, "a positive integer or a list of them"),
        "attention_head_dim": (False, lambda v: v is None or ints(v), "a positive integer or a list of them"),
        "sample_size": (False, lambda v: v is None or ints(v), "a positive integer"),
        "norm_num_groups": (False, lambda v: v is None or positive(v), "a positive integer"),
    }
    for key, (required, valid, what) in rules.items():
        if key not in config:
            if required:
                raise InputError(f"'{where}' has no '{key}'; is it a UNet config?")
            continue
        if not valid(config[key]):
            raise InputError(f"'{where}': '{key}' must be {what}, not {config[key]!r}")
    for key in ("down_block_types", "up_block_types", "mid_block_type"):
        names = config.get(key) or []
        for name in [names] if isinstance(names, str) else names:
            if not isinstance(name, str) or not hasattr(unet_2d_blocks, name):
                raise InputError(f"'{where}': '{key}' names {name!r}, which is not a diffusers UNet block")
    if len(config["block_out_channels"]) != len(config["down_block_types"]):
        raise InputError(f"'{where}': block_out_channels has {len(config['block_out_channels'])} entries for "
                         f"{len(config['down_block_types'])} down blocks")
    return config


def read_unet_config(path: Path) -> dict:
    """A UNet folder's ``config.json``, read and checked (``check_unet_config``)."""
    import json

    try:
        return check_unet_config(json.loads(path.read_text()), path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"'{path}' is not readable JSON ({err}); re-create it") from None


def check_unet_supported(unet) -> None:
    name = type(unet).__name__
    if name != SUPPORTED_UNET and not name.startswith("Asdm"):
        raise InputError(f"unsupported UNet class {name}; asdm-export handles {SUPPORTED_UNET} (SD1.x / SD2.x)")
    cfg = unet.config
    if getattr(cfg, "addition_embed_type", None) or getattr(cfg, "class_embed_type", None):
        raise InputError(
            "UNets with extra conditioning (addition_embed_type / class_embed_type, e.g. SDXL) are not supported; "
            "use an SD1.x / SD2.x model"
        )


def resolve_model(spec: str | Path, allow_pickle: bool | None = False, config: str | None = None) -> ModelSource:
    """Turn what the user typed after ``--model`` into a ``ModelSource`` (validated, not loaded). ``allow_pickle``
    None: pickled weights are refused without offering ``--allow-pickle`` (a command that has none)."""
    spec = str(spec)
    if presets.is_preset_id(spec):
        return ModelSource(spec, "preset", presets.materialize(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return ModelSource(spec, "pipeline", path, allow_pickle)
        if (path / "config.json").is_file():
            return ModelSource(spec, "unet", path, allow_pickle)
        raise InputError(
            f"'{spec}' is neither a diffusers pipeline folder (model_index.json) nor a UNet folder (config.json)"
        )
    if path.is_file():
        config = _resolve_config(config)
        if path.suffix == ".safetensors":
            _check_safetensors_header(path)
            return ModelSource(spec, "single-file", path, allow_pickle, config)
        if path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise InputError(pickle_refused(f"'{path.name}' is a pickled checkpoint",
                                                offer=allow_pickle is not None))
            return ModelSource(spec, "single-file", path, allow_pickle, config)
        raise InputError(f"'{spec}' is not a model: expected a folder, .safetensors file or hub id")
    if HUB_ID.match(spec):  # owner/name: a path such as ./a/b or ~/a/b never matches (its first character)
        return ModelSource(spec, "pipeline", _download(spec, allow_pickle), allow_pickle)
    raise InputError(f"model '{spec}' not found: no such file or folder (and not an asdm: preset or hub id)")


def pickle_refused(what: str, offer: bool = True) -> str:
    """The refusal of pickled weights; ``offer``: name --allow-pickle (the command has it)."""
    return (f"{what}; loading pickled weights can run code: convert them to safetensors"
            + (", or pass --allow-pickle if you trust the file" if offer else " (this command reads safetensors only)"))


def _resolve_config(config: str | None) -> str | None:
    """--config as something that still means the same from another folder: presets and local folders as
    absolute paths (recorded in manifests; `check` re-opens the model from wherever it runs), hub ids as is."""
    if not config:
        return None
    if presets.is_preset_id(config):
        return str(presets.materialize(config))
    folder = Path(config).expanduser()
    if folder.is_dir():
        return str(folder.resolve())
    if HUB_ID.match(config):
        return config
    raise InputError(f"--config '{config}' not found: pass a diffusers pipeline folder, an asdm: preset or a hub id")


# diffusers' / transformers' advice for weights that do not fit the config: options of their own API, which
# would load the model with random weights; the user's fix is the right config or the right file
_LIBRARY_ADVICE = re.compile(r"\s*(If you want to instead overwrite|Please make sure to pass|You can set "
                             r"`ignore_mismatched_sizes|You may consider adding `ignore_mismatched_sizes).*$", re.I)


def load_failure(err: BaseException) -> str:
    """``first_line(err)`` without the loading library's advice about its own options."""
    line = first_line(err)
    cut = _LIBRARY_ADVICE.sub("", line)
    return line if cut == line else f"{cut} (the weights do not fit the config: is it the config of this model?)"


def _check_safetensors_header(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error type for every kind of corruption
        if out_of_memory(err):  # its mmap refused: the file may well be whole
            raise OutOfMemory(f"out of memory opening '{path}' ({first_line(err)}): {MEMORY_ADVICE}") from err
        raise InputError(f"'{path}' is not a readable safetensors file ({first_line(err)}); download or save it "
                         "again") from err


def _download(repo_id: str, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors"] + (["*.bin", "*.ckpt"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # huggingface_hub raises many types (HTTP, offline, not found)
        raise FetchError(
            f"could not fetch '{repo_id}' from the Hugging Face Hub ({type(err).__name__}); "
            "check the id and the network, or pass a local folder"
        ) from err


def load_tokenizer(folder: Path, what: str = "folder"):
    """``transformers.CLIPTokenizer`` of ``folder``, refused in one line where it is unreadable or has no
    vocabulary: an empty folder loads as a tokenizer of two tokens, which maps every prompt to the same ids,
    and the images then ignore their prompts without an error. ``what`` is said in the advice."""
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as err:  # a damaged file of the right size
        raise InputError(f"cannot read the tokenizer in '{folder}' ({first_line(err, with_type=True)}); "
                         f"re-create the {what}") from None
    # byte-level BPE (CLIP's) has a token for each of the 256 bytes, or some text has no tokens
    if len(tokenizer) < 256:
        raise InputError(f"the tokenizer in '{folder}' has {len(tokenizer)} tokens (no vocab.json / merges.txt?); "
                         f"re-create the {what}")
    return tokenizer


def load_scheduler(folder: Path):
    """The diffusers scheduler that ``folder/scheduler_config.json`` names, built from that config."""
    import json

    import diffusers

    config = json.loads((Path(folder) / "scheduler_config.json").read_text())
    return getattr(diffusers, config["_class_name"]).from_config(config)


def load_pipeline_part(source: ModelSource, part: str):
    """One pipeline component (``text_encoder`` or ``vae``) in float32, eval mode."""
    if not source.has_pipeline:
        raise InputError(f"'{source.spec}' has no {part}; pass a whole pipeline")
    try:
        if source.kind == "single-file":
            module = getattr(source.load_pipeline(), part)
        else:
            source._check_weights(source.path / part)
            if part == "text_encoder":
                from transformers import CLIPTextModel

                module = CLIPTextModel.from_pretrained(str(source.path / part),
                                                       use_safetensors=None if source.allow_pickle else True)
            else:
                from diffusers import AutoencoderKL

                module = AutoencoderKL.from_pretrained(str(source.path / part),
                                                       use_safetensors=None if source.allow_pickle else True)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise InputError(f"could not load the {part} from '{source.spec}': {load_failure(err)}") from err
    return module.float().eval()
