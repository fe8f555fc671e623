"""Triton model repositories for an engine folder or bundle (``config.pbtxt`` through Triton's own protobuf).

Two layouts:

- serving (``asdm-export serve``): one model, ``asdm``, whose Python-backend instances each run the whole
  ``AsdmPipeline`` on the folder in place (ORT, PyTorch or TensorRT), with Triton's dynamic batcher.
- deployment (``asdm-export triton-repo``): a self-contained repository for a GPU node. Every graph is its own
  model (``tensorrt_plan`` for TensorRT engines, ``onnxruntime_onnx`` for ONNX graphs, ``python`` to run a graph
  on ONNX Runtime inside the Python backend where Triton has no ONNX Runtime backend) with the engines' profiles
  as its shapes and one instance group per GPU; ``asdm`` runs the denoising loop and calls the graph models
  through Triton's business-logic scripting (BLS), so the graph models are scheduled, batched and placed by
  Triton like any other.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..artifacts import atomic_output_dir, changed_files, check_output, require_engines, write_manifest
from ..errors import InputError, MissingBackendError
from ..limits import INSTANCES_MAX
from ..runtime.folders import check_backend_choice, loop_batch_limit, open_manifest
from ..runtime.schedulers import check_scheduler, folder_scheduler

LOOP_MODEL = "asdm"
SERVED_LINK = "engines"  # in the serving repository's loop model version: a link to the folder it serves
SHIM = '''"""Triton Python-backend model: {what} (asdm-export {version})."""
from asdm_export.serve.model import {cls} as TritonPythonModel  # noqa: F401
'''
# The ``asdm`` model's inputs (one row per image) in the protocol's datatype names; all but prompt optional.
LOOP_INPUTS = {"prompt": "BYTES", "negative_prompt": "BYTES", "steps": "INT32", "guidance_scale": "FP32",
               "seed": "INT64", "height": "INT32", "width": "INT32"}
PLATFORMS = ("tensorrt_plan", "onnxruntime_onnx", "python")
# How long the loop model's batcher holds a request for others to join it: small against a request's own time.
# `serve` runs anywhere, CPUs included, where an image takes seconds; a deployment repository is for GPU nodes,
# where an image takes a fraction of a second, so a lone request must not wait 20 ms.
SERVE_DELAY_US = 20_000
DEPLOY_DELAY_US = 2_000
QUEUE_TIMEOUT_MAX_US = 86_400 * 10**6  # the longest a request waits in the ``asdm`` model's queue: a day
MAX_QUEUE = 1_000_000  # requests; Triton's field is 64-bit, a larger number is a typo
GPU_ID_MAX = 1023  # a CUDA device id; a larger one is a typo
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int32": "TYPE_INT32",
          "int64": "TYPE_INT64", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        from ..errors import MissingBackendError
        from .server import INSTALL_HINT

        raise MissingBackendError(f"Triton model configs need tritonclient; install it with {INSTALL_HINT}") from None
    return model_config_pb2, text_format


def graph_model_name(graph: str) -> str:
    """Triton model name of a graph (``unet.full`` -> ``unet_full``)."""
    return graph.replace(".", "_")


def loop_config(max_batch: int, instances: int, kind: str, delay_us: int, parameters: dict[str, str],
                gpus: list[int] | None = None, max_queue: int = 0, queue_timeout_us: int = 0):
    """The ``asdm`` text-to-image model: prompt(s) in, uint8 images out, dynamic batching. Its queue:
    ``max_queue`` requests may wait (0: any number; more are refused at once: the server is busy), each up to
    ``queue_timeout_us`` (0: a day), or up to its own ``timeout`` parameter if sooner (the project's client
    sends one: Triton's HTTP front end does not see a client leave, so this is how a queued request whose
    client gave up is dropped)."""
    mc, _ = _pb()
    c = mc.ModelConfig(name=LOOP_MODEL, backend="python", max_batch_size=max_batch)
    for name, kind in LOOP_INPUTS.items():  # config.pbtxt calls BYTES "STRING"
        c.input.add(name=name, data_type=getattr(mc, "TYPE_STRING" if kind == "BYTES" else f"TYPE_{kind}"), dims=[1],
                    optional=name != "prompt")
    c.output.add(name="image", data_type=mc.TYPE_UINT8, dims=[-1, -1, 3])
    if max_batch > 1:
        c.dynamic_batching.max_queue_delay_microseconds = delay_us
    policy = c.dynamic_batching.default_queue_policy  # the dynamic batcher's queue, batches of 1 too
    policy.max_queue_size = max_queue
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    # a request's own timeout applies only under a default one (Triton 2.51: a 2 s request timeout was ignored
    # with none, honoured under one of an hour): "no limit" is a day
    policy.default_timeout_microseconds = queue_timeout_us or QUEUE_TIMEOUT_MAX_US
    policy.allow_timeout_override = True
    _instances(c, instances, kind, gpus)
    for key, value in parameters.items():
        c.parameters[key].string_value = str(value)
    return c


def graph_config(entry: dict, name: str, platform: str, instances: int, gpus: list[int] | None,
                 engine_profile: dict | None = None):
    """A graph (or one engine of it) as a model: its inputs and outputs with the manifest's dtypes; an axis is
    fixed where the engine's profile fixes it, else -1 (the range is in the engine, and in the parameters);
    the batch axis is part of the shape (max_batch_size 0)."""
    mc, _ = _pb()
    c = mc.ModelConfig(name=name, max_batch_size=0)
    if platform == "python":
        c.backend = "python"
    else:
        c.platform = platform
    for io, items in ((c.input, entry["inputs"]), (c.output, entry["outputs"])):
        for t in items:
            if t["dtype"] not in DTYPES:
                raise InputError(f"graph {entry['name']}: {t['name']} has dtype {t['dtype']}, which Triton's "
                                 "configs do not name here")
            dims = [d if isinstance(d, int) else -1 for d in t["shape"]]
            fixed = (engine_profile or {}).get(t["name"])
            if fixed is not None:
                dims = [lo if lo == hi else -1 for lo, hi in zip(fixed["min"], fixed["max"])]
            io.add(name=t["name"], data_type=getattr(mc, DTYPES[t["dtype"]]), dims=dims)
    _instances(c, instances, "gpu" if gpus is not None else "cpu", gpus)
    if platform == "python" and gpus is not None:  # ONNX Runtime in the Python backend, on its instance's GPU
        c.parameters["provider"].string_value = "cuda"
    if engine_profile:
        for tensor, rng in engine_profile.items():
            c.parameters[f"profile.{tensor}"].string_value = ":".join("x".join(map(str, rng[k]))
                                                                     for k in ("min", "opt", "max"))
    else:
        for axis, rng in entry.get("profile", {}).items():
            c.parameters[f"profile.{axis}"].string_value = f"{rng['min']}:{rng['opt']}:{rng['max']}"
    return c


def _instances(c, count: int, kind: str, gpus: list[int] | None) -> None:
    mc, _ = _pb()
    group = c.instance_group.add(count=count)
    group.kind = mc.ModelInstanceGroup.KIND_GPU if kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    if kind == "gpu" and gpus:
        group.gpus.extend(gpus)


def write_config(folder: Path, config) -> None:
    _, text_format = _pb()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))


def read_config(path: Path):
    """Parse a ``config.pbtxt`` with Triton's own schema (what the server does)."""
    mc, text_format = _pb()
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())


def _shim(folder: Path, cls: str, what: str) -> None:
    from .. import __version__

    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "model.py").write_text(SHIM.format(cls=cls, what=what, version=__version__))


def write_serving_repo(engines: Path | str, out: Path, *, backend: str | None = None, max_batch: int | None = None,
                       instances: int = 1, delay_us: int = SERVE_DELAY_US, provider: str | None = None,
                       device: str | None = None, dtype: str | None = None, scheduler: str | None = None,
                       threads: int = 0, max_prompt_chars: int | None = None, max_queue: int = 0,
                       queue_timeout_us: int = 0) -> int:
    """The one-model repository ``serve`` runs: ``asdm`` on ``engines`` in place; returns its max batch.
    ``max_queue``, ``queue_timeout_us``: see ``loop_config``."""
    check_scheduler(scheduler)
    manifest = open_manifest(Path(engines))
    if not manifest.get("pipeline"):
        raise InputError(f"'{engines}' has no text encoder / VAE graphs; export a whole pipeline to serve it")
    if scheduler:  # before a server starts (its model's warm-up would fail, and with it the start)
        folder_scheduler(engines, manifest, scheduler)
    check_instances(instances)
    max_batch = check_max_batch(manifest, max_batch)
    runs_on = check_backend_choice(Path(engines), manifest, backend, device or None, dtype or None, provider or None)
    kind = instance_kind(runs_on, provider, device)
    if kind == "gpu":
        check_gpu_driver()
    check_queue(max_queue, queue_timeout_us, delay_us if max_batch > 1 else 0)  # batches of 1 wait for none
    # The folder through a link in the model's version folder: the backend stub's Python encodes paths as ASCII
    # (its interpreter ignores the locale), so a folder named in other characters did not exist for it.
    # ``package``: the model checks that it runs this asdm-export (``model.check_package``).
    params = {"engines": SERVED_LINK, "package": str(package_folder()),
              "backend": backend or "", "provider": provider or "", "device": device or "", "dtype": dtype or "",
              "scheduler": scheduler or "", "threads": threads, "max_prompt_chars": max_prompt_chars or ""}
    _shim(out / LOOP_MODEL, "Txt2ImgModel", "text-to-image over AsdmPipeline")
    link = out / LOOP_MODEL / "1" / SERVED_LINK  # in the version folder: Triton reads the model's as versions
    if link.is_symlink():  # a repository written again
        link.unlink()
    link.symlink_to(Path(engines).resolve(), target_is_directory=True)
    write_config(out / LOOP_MODEL, loop_config(max_batch, instances, kind, delay_us, params, max_queue=max_queue,
                                               queue_timeout_us=queue_timeout_us))
    return max_batch


def package_folder() -> Path:
    """The folder of the asdm_export package this process runs."""
    import asdm_export

    return Path(asdm_export.__file__).resolve().parent


def check_instances(instances: int) -> None:
    if not 1 <= instances <= INSTANCES_MAX:
        raise InputError(f"--instances must be 1 to {INSTANCES_MAX}, not {instances}")


def check_gpus(gpus: list[int] | None) -> None:
    """None: no GPU (CPU instances); else distinct CUDA device ids, as Triton's instance groups take them."""
    if gpus is not None and (not gpus or len(set(gpus)) != len(gpus)
                             or any(not isinstance(g, int) or not 0 <= g <= GPU_ID_MAX for g in gpus)):
        raise InputError(f"--gpus {','.join(map(str, gpus)) or '(none)'} is not a list of distinct GPU ids "
                         f"(0 to {GPU_ID_MAX})")


def check_queue(max_queue: int, queue_timeout_us: int, delay_us: int) -> None:
    if not 0 <= max_queue <= MAX_QUEUE or not 0 <= queue_timeout_us <= QUEUE_TIMEOUT_MAX_US:
        raise InputError(f"the queue takes 0 (no limit) to {MAX_QUEUE} requests and a timeout of 0 to 86400 s, not "
                         f"max_queue {max_queue}, timeout {queue_timeout_us / 1e6:g} s")
    if queue_timeout_us and queue_timeout_us <= delay_us:  # every lone request would wait out the delay and be refused
        raise InputError(f"--queue-timeout {queue_timeout_us / 1e6:g} s is not longer than the batcher's delay "
                         f"({delay_us / 1000:g} ms), for which it holds a lone request; give a longer one")


def instance_kind(backend: str, provider: str | None, device: str | None) -> str:
    """Triton's instance kind for the loop model: ``gpu`` when its backend (as ``check_backend_choice``
    resolved it) runs on CUDA."""
    on_gpu = backend == "trt" or (backend == "torch" and (device or "").startswith("cuda")) or \
        (backend == "ort" and provider in ("cuda", "trt"))
    return "gpu" if on_gpu else "cpu"


def check_gpu_driver() -> None:
    """A GPU model instance makes Triton initialise CUDA at start: without a driver it exits with
    "CudaDriverHelper has not been initialized". Say so in one line before a server starts."""
    from asdm_export.runtime.runners import gpu_present

    if not gpu_present():
        raise MissingBackendError("serving on the GPU (--backend trt, --provider cuda|trt or --device cuda) needs "
                                  "an NVIDIA GPU and its driver; none is here (serve on the CPU: --backend ort "
                                  "--provider cpu)")


def check_max_batch(manifest: dict, max_batch: int | None) -> int:
    """The requests one loop takes: ``max_batch`` if the UNet graphs' profiles allow it (default: their limit)."""
    limit = loop_batch_limit(manifest)
    if max_batch is None:
        return limit
    if not 1 <= max_batch <= limit:
        raise InputError(f"--max-batch {max_batch} needs UNet graphs of batch {2 * max_batch} (guidance doubles it); "
                         f"these take up to {2 * limit}: choose 1 to {limit}, or export with a larger --batch")
    return max_batch


def model_names(entry: dict) -> list[str]:
    """The Triton models of a graph: one, or one per engine where a graph has several (one per profile)."""
    count = len(entry.get("engines") or [None])
    name = graph_model_name(entry["name"])
    return [name] if count == 1 else [f"{name}_{index}" for index in range(count)]


def check_model_names(manifest: dict) -> None:
    """Every graph's models named apart from each other and from the loop model: two graphs under one name
    (a UNet named ``asdm``, as bundles of earlier releases allowed; ``a.full`` and a UNet ``a_full``) would share
    a model folder, and the loop would call itself."""
    seen = {LOOP_MODEL: "the denoising loop"}
    for entry in manifest["graphs"]:
        for name in model_names(entry):
            if name in seen:
                raise InputError(f"graph {entry['name']} and {seen[name]} would both be Triton model '{name}'; "
                                 "export the bundle again with other UNet names (--unet NAME=MODEL)")
            seen[name] = f"graph {entry['name']}"


def default_platform(manifest: dict) -> str:
    return "tensorrt_plan" if manifest["kind"] == "engines" and manifest.get("backend") == "trt" else "onnxruntime_onnx"


def write_triton_repo(engines: Path | str, out: Path | str, *, platform: str | None = None, instances: int = 1,
                      gpus: list[int] | None = None, max_batch: int | None = None,
                      delay_us: int = DEPLOY_DELAY_US, overwrite: bool = False, max_queue: int = 0,
                      queue_timeout_us: int = 0, scheduler: str | None = None) -> dict:
    """A deployment repository for ``engines`` (an engine folder or a bundle); returns its manifest.
    ``max_queue``, ``queue_timeout_us``: the ``asdm`` model's queue (``loop_config``); ``scheduler``: a sampler
    of ``runtime.schedulers.SCHEDULERS``, written as the repository's scheduler in place of the folder's own."""
    check_scheduler(scheduler)
    engines = Path(engines)
    manifest = open_manifest(engines)
    if not manifest.get("pipeline"):
        raise InputError(f"'{engines}' has no text encoder / VAE graphs; export a whole pipeline to serve it")
    # checked now (every request would fail), written into the repository below
    chosen = folder_scheduler(engines, manifest, scheduler) if scheduler else None
    if manifest["kind"] == "engines" and manifest.get("backend") == "torch":  # whatever --platform says
        raise InputError("PyTorch program folders have no Triton backend of their own; make the deployment "
                         "repository from the bundle or from TensorRT engines, or `serve --backend torch`")
    platform = platform or default_platform(manifest)
    if platform not in PLATFORMS:
        raise InputError(f"unknown platform '{platform}'; choose one of {', '.join(PLATFORMS)}")
    if platform == "tensorrt_plan":
        require_engines(engines, manifest, "trt", instead="make the repository of its ONNX graphs with --platform "
                                                          "onnxruntime_onnx or python")
    check_instances(instances)
    check_gpus(gpus)
    max_batch = check_max_batch(manifest, max_batch)
    check_queue(max_queue, queue_timeout_us, delay_us if max_batch > 1 else 0)  # batches of 1 wait for none
    out = check_output(out, overwrite, reads=(engines,))
    changed = changed_files(engines, manifest, trust_times=True)  # a deployment gets the files that were checked
    if changed:
        raise InputError(f"'{engines / changed[0]}' changed since it was written (sha256 differs from the "
                         f"manifest{f'; {len(changed) - 1} more' if len(changed) > 1 else ''}); re-create the folder, "
                         "then check it before deploying it")
    suffix = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx", "python": "model.onnx"}[platform]
    check_model_names(manifest)
    models = {}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        for entry in manifest["graphs"]:
            # an engine folder's graph may hold several engines (one per profile): one model each, and the
            # loop picks the one whose profile takes the step's shapes, as the TensorRT backend does
            records = entry.get("engines") or [{"file": entry["file"], "data_files": entry.get("data_files", []),
                                                "profile": None}]
            models[entry["name"]] = []
            for name, record in zip(model_names(entry), records):
                version = tmp / name / "1"
                version.mkdir(parents=True)
                shutil.copy2(engines / record["file"], version / suffix)
                for data in record.get("data_files", []):  # ONNX external weights sit beside the graph
                    shutil.copy2(engines / data, version / Path(data).name)
                write_config(tmp / name, graph_config(entry, name, platform, instances, gpus, record.get("profile")))
                if platform == "python":
                    _shim(tmp / name, "OrtGraphModel", f"graph {entry['name']} on ONNX Runtime")
                models[entry["name"]].append({"model": name, "profile": record.get("profile")})
        # the loop model's own files: manifest, tokenizer, scheduler (the graphs are the models above)
        pipe_dir = tmp / LOOP_MODEL / "1" / "pipeline"
        pipe_dir.mkdir(parents=True)
        for key in ("tokenizer", "scheduler"):
            shutil.copytree(engines / manifest["pipeline"][key], pipe_dir / manifest["pipeline"][key])
        if chosen is not None:  # a deployment's files say what it runs: the loop model reads its folder's own
            chosen.save_config(str(pipe_dir / manifest["pipeline"]["scheduler"]))
        (pipe_dir / "graphs.json").write_text(json.dumps({"source": manifest.get("source"), "kind": manifest["kind"],
                                                           "backend": manifest.get("backend", "ort"),
                                                           "models": models,
                                                           "manifest": manifest}, indent=2) + "\n")
        write_config(tmp / LOOP_MODEL, loop_config(max_batch, instances, "cpu", delay_us,
                                                   {"pipeline": "pipeline", "graphs": "triton"},
                                                   max_queue=max_queue, queue_timeout_us=queue_timeout_us))
        _shim(tmp / LOOP_MODEL, "Txt2ImgModel", "text-to-image: the denoising loop over the graph models (BLS)")
        record = write_manifest(tmp, {"kind": "triton-repo", "source": str(engines.resolve()), "platform": platform,
                                      "models": [LOOP_MODEL, *(m["model"] for v in models.values() for m in v)],
                                      "max_batch": max_batch, "max_queue": max_queue,
                                      "queue_timeout_us": queue_timeout_us, "scheduler": scheduler,
                                      "instances": instances, "gpus": gpus})
    return record
