"""The text-to-image model that Triton's Python backend runs: ``AsdmPipeline`` on an engine folder or bundle.

Triton's dynamic batcher hands ``execute`` the requests that arrived within the queue delay. Each request is
parsed and checked on its own (a bad one gets its own one-line error; the others are served); the good ones
are grouped by what one denoising loop can share (steps, size, guidance on/off), in chunks of the UNet
graphs' batch, and each chunk is one ``AsdmPipeline.generate`` call: per-request seeds, prompts and guidance
scales, so a batched request gets the image it would get alone. A request whose client has gone (cancelled)
is dropped before its loop starts, and a loop all of whose clients have gone stops at its next step (Triton
reports cancellation from gRPC clients; its HTTP frontend does not).

Inputs (each request may carry several rows; row i is image i): prompt (BYTES), and optionally
negative_prompt (BYTES), steps (INT32), guidance_scale (FP32), seed (INT64; without it row i takes seed i, as
``run`` gives image i seed ``seed + i``), height / width (INT32; the same for all rows of a request).
Output: image (UINT8, rows x H x W x 3).
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

try:  # only inside Triton's Python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside the server (docs, tests of the parsing)
    pb_utils = None

from ..errors import AsdmError, Cancelled, InputError, MissingBackendError, StageError, first_line
from ..runtime.backends import Backend
from ..runtime.pipeline import AsdmPipeline, ImageRequest
from .server import EXECUTED, EXECUTING

log = logging.getLogger(__name__)
OPTIONAL = {"negative_prompt": "", "steps": None, "guidance_scale": 7.5, "seed": 0, "height": None, "width": None}
MAX_PROMPT_CHARS = 1000  # CLIP reads 77 tokens (a few hundred characters); more is a client error, not a prompt


@dataclass(frozen=True)
class Failure:
    """A request that gets no image: its one-line message, and whose fault it is (``kind``: ``input``, the
    client's request; ``cancelled``, its client left; ``unavailable``, a backend this server lacks; ``internal``,
    the server's), which the response's error code says: INVALID_ARG, CANCELLED, UNAVAILABLE, INTERNAL (Triton's
    HTTP frontend answers 400, 400, 503, 500)."""
    message: str
    kind: str = "input"

    @classmethod
    def of(cls, err: Exception) -> "Failure":
        if isinstance(err, InputError):
            return cls(str(err), "input")
        if isinstance(err, Cancelled):  # the loop stopped: every client of its batch had gone
            return cls(str(err), "cancelled")
        if isinstance(err, MissingBackendError):
            return cls(str(err), "unavailable")
        if isinstance(err, AsdmError):  # a graph model that failed, a stage that failed: not the request's fault
            return cls(str(err), "internal")
        return cls(f"generation failed: {first_line(err, with_type=True)}", "internal")


def parse_rows(inputs: dict[str, np.ndarray | None], max_prompt_chars: int = MAX_PROMPT_CHARS) -> list[ImageRequest]:
    """The ImageRequests of one Triton request, from its input arrays (rows x 1); InputError if malformed."""
    prompt = inputs.get("prompt")
    if prompt is None or prompt.size == 0 or prompt.ndim == 0:
        raise InputError("the request has no prompt")
    rows = prompt.shape[0]
    columns = {}
    for name in ("prompt", *OPTIONAL):
        value = inputs.get(name)
        if value is None:  # no seed: row i seed i, so a request's rows are different images
            columns[name] = list(range(rows)) if name == "seed" else [OPTIONAL[name]] * rows
            continue
        if value.ndim == 0 or value.shape[0] != rows or value.size != rows:
            raise InputError(f"input '{name}' has shape {list(value.shape)}; each request row takes one value "
                             f"({rows} rows)")
        value = value.reshape(rows, 1)
        columns[name] = [v.item() if isinstance(v, np.generic) else v for v in value[:, 0]]
    out = []
    for i in range(rows):
        texts = {}
        for name in ("prompt", "negative_prompt"):
            text = columns[name][i]
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError:
                    raise InputError(f"{name} is not UTF-8 text") from None
            if len(text) > max_prompt_chars:
                raise InputError(f"{name} has {len(text)} characters; the limit is {max_prompt_chars} (the text "
                                 "encoder reads 77 tokens)")
            texts[name] = text
        out.append(ImageRequest(texts["prompt"], texts["negative_prompt"], columns["steps"][i],
                                columns["guidance_scale"][i], columns["seed"][i], columns["height"][i],
                                columns["width"][i]))
    return out


def serve_requests(pipe: AsdmPipeline, rows: dict[int, list[ImageRequest]], max_batch: int,
                   cancelled=lambda i: False) -> dict[int, list[np.ndarray] | Failure]:
    """Images (or a ``Failure``) for each request index: rows grouped by ``pipe.batch_key`` in chunks of
    ``max_batch``, each chunk one denoising loop. ``cancelled(i)`` is asked before a chunk runs and before each
    step of its loop (which stops when all of its requests are cancelled)."""
    results: dict[int, list | Failure] = {}
    groups = defaultdict(list)
    for i, requests in rows.items():
        try:
            resolved = [pipe.resolve(r) for r in requests]
            if len({(r.height, r.width) for r in resolved}) > 1:  # its images are answered as one array
                raise InputError("the rows of one request must share height and width; send other sizes as "
                                 "separate requests")
        except AsdmError as err:
            results[i] = Failure.of(err)
            continue
        results[i] = [None] * len(resolved)
        for j, r in enumerate(resolved):
            groups[pipe.batch_key(r)].append((i, j, r))
    for items in groups.values():
        for start in range(0, len(items), max_batch):
            chunk = []
            for i, j, r in items[start:start + max_batch]:
                if not isinstance(results[i], list):  # failed or cancelled already
                    continue
                if cancelled(i):
                    results[i] = Failure("cancelled: the client closed the request", "cancelled")
                else:
                    chunk.append((i, j, r))
            if not chunk:
                continue
            try:  # the loop stops early when every client of the chunk has gone
                images = pipe.generate([r for _, _, r in chunk],
                                       should_stop=lambda ids={i for i, _, _ in chunk}: all(map(cancelled, ids)))
            except Exception as err:  # noqa: BLE001 - one line per request; the server keeps serving
                if not isinstance(err, AsdmError):
                    log.exception("generation failed")
                images = [Failure.of(err)] * len(chunk)
            for (i, j, _), image in zip(chunk, images):
                if isinstance(image, Failure):
                    results[i] = image
                elif isinstance(results[i], list):
                    results[i][j] = image
    return results


class Txt2ImgModel:
    """The ``asdm`` model for Triton's Python backend (``initialize`` / ``execute`` / ``finalize``).

    Parameters (config.pbtxt): ``engines`` (a folder run in place by ``serve``), or ``pipeline`` (a folder of
    the model version with tokenizer, scheduler and graphs.json) with ``graphs: triton`` (the deployment
    repository: each graph is a Triton model, called through business-logic scripting); ``backend``,
    ``device``, ``dtype``, ``scheduler``, ``threads``, ``max_prompt_chars``."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.instance = args.get("model_instance_name", "asdm")  # named in the batch lines (TritonServer)
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("threads") or 0)
        if threads:
            torch.set_num_threads(threads)
        if params.get("graphs") == "triton":
            folder = Path(args["model_repository"]) / args["model_version"] / params.get("pipeline", "pipeline")
            graphs = json.loads((folder / "graphs.json").read_text())
            self.pipe = AsdmPipeline(folder, graphs["manifest"], TritonGraphBackend(graphs["manifest"],
                                                                                    graphs["models"]))
        else:
            check_package(params.get("package"))
            # relative: a link in the version folder (write_serving_repo); messages name the folder it links to,
            # where this Python can spell it (not the temporary repository's link)
            link = Path(args["model_repository"]) / args["model_version"] / params["engines"]
            real = link.resolve()
            engines = real if str(real).isascii() else link
            self.pipe = AsdmPipeline.from_bundle(engines, backend=params.get("backend") or None,
                                                 provider=params.get("provider") or None,
                                                 device=params.get("device") or None,
                                                 dtype=params.get("dtype") or None, gpu=instance_gpu(args),
                                                 threads=threads, scheduler=params.get("scheduler") or None)
        self.max_batch = max(1, min(self.pipe.max_batch, int(config.get("max_batch_size") or 1)))
        self.max_prompt_chars = int(params.get("max_prompt_chars") or MAX_PROMPT_CHARS)
        if params.get("graphs") != "triton":  # sessions (and any compilation) now, not in the first request
            self.pipe.generate([ImageRequest("warm-up", steps=self._warm_steps())])

    def _warm_steps(self) -> int:
        steps = min(self.pipe.schedule.steps, 2)
        try:
            self.pipe.resolve(ImageRequest("", steps=steps))
        except InputError:  # explicit schedules take their own step count only
            steps = self.pipe.schedule.steps
        return steps

    def execute(self, requests: list) -> list:
        # the pair tells a stop that ran out of time whether a batch was cut off: Triton's own in-flight count
        # in its log stays 0 for a Python-backend model while execute runs (TritonServer.drained)
        pb_utils.Logger.log_info(f"{EXECUTING} {len(requests)} request(s) on {self.instance}")
        try:
            return self._execute(requests)
        finally:
            pb_utils.Logger.log_info(f"{EXECUTED} {len(requests)} request(s) on {self.instance}")

    def _execute(self, requests: list) -> list:
        errors, rows = {}, {}
        for i, request in enumerate(requests):
            try:
                inputs = {name: _input(request, name) for name in ("prompt", *OPTIONAL)}
                rows[i] = parse_rows(inputs, self.max_prompt_chars)
            except AsdmError as err:
                errors[i] = Failure.of(err)
        results = serve_requests(self.pipe, rows, self.max_batch, lambda i: _cancelled(requests[i]))
        results.update(errors)
        responses = []
        for i in range(len(requests)):
            result = results[i]
            if isinstance(result, Failure) and result.kind == "cancelled":
                pb_utils.Logger.log_info(f"asdm: request {_printable(requests[i].request_id()) or i}: "
                                         f"{result.message}")
            if isinstance(result, Failure):
                responses.append(pb_utils.InferenceResponse(error=_error(result)))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("image", np.stack(result))]))
        return responses

    def finalize(self) -> None:
        self.pipe = None


class TritonGraphBackend(Backend):
    """The graphs as models of the same Triton server, called from the loop model (BLS): Triton schedules
    and places them (instance groups per GPU) like any other model."""

    name = "triton"

    def __init__(self, manifest: dict, models: dict[str, list[dict]]):
        self.models = models  # graph -> [{model, profile}]: one model per engine (profile None: any shape)
        self.entries = {g["name"]: g for g in manifest["graphs"]}

    def graph_names(self) -> list[str]:
        return list(self.models)

    def model_for(self, graph: str, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """The model of ``graph`` that takes these shapes, chosen as the TensorRT backend chooses its engine."""
        from ..runtime.profiles import select_engine

        i = select_engine(self.models[graph], shapes)
        return None if i is None else self.models[graph][i]["model"]

    def covers(self, graph, shapes):
        return graph in self.models and self.model_for(graph, shapes) is not None

    def built_shapes(self, graph):
        from ..runtime.profiles import profile_points

        profiles = [v["profile"] for v in self.models.get(graph, ())]
        return [] if None in profiles else profile_points(profiles)  # a model of any shape: no size to prefer

    def run(self, graph, feeds):
        self._require(graph)
        entry = self.entries[graph]
        model = self.model_for(graph, {k: tuple(v.shape) for k, v in feeds.items()})
        if model is None:
            raise InputError(f"no engine of graph {graph} takes these shapes "
                             f"({', '.join(f'{k} {list(v.shape)}' for k, v in feeds.items())})")
        inputs = [pb_utils.Tensor(t["name"], np.ascontiguousarray(feeds[t["name"]].detach().cpu().numpy(),
                                                                  dtype=t["dtype"]))
                  for t in entry["inputs"]]
        response = pb_utils.InferenceRequest(model_name=model, inputs=inputs,
                                             requested_output_names=[t["name"] for t in entry["outputs"]]).exec()
        if response.has_error():
            raise StageError(f"graph model {model}: {response.error().message()}")
        out = {}
        for t in entry["outputs"]:
            tensor = pb_utils.get_output_tensor_by_name(response, t["name"])
            # the loop runs on this backend's device, the CPU: a TensorRT model's GPU output comes over
            out[t["name"]] = torch.from_numpy(tensor.as_numpy()) if tensor.is_cpu() else \
                torch.from_dlpack(tensor.to_dlpack()).cpu()
        return out


class OrtGraphModel:
    """One ONNX graph on ONNX Runtime inside the Python backend, for Triton builds without the ONNX Runtime
    backend (the ``nvidia-pytriton`` server carries only the Python one). Parameters: ``provider``, ``threads``."""

    def initialize(self, args: dict) -> None:
        from ..runtime.runners import ort_session

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort_session(path, params.get("provider") or "cpu", int(params.get("threads") or 0),
                                   gpu=instance_gpu(args))
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests: list) -> list:
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument  # inputs the graph cannot take

        responses = []
        for request in requests:
            try:
                feeds = {name: _input(request, name) for name in self.inputs}
                missing = [name for name, value in feeds.items() if value is None]
                if missing:
                    raise InputError(f"missing input {', '.join(missing)}")
                values = self.session.run(self.outputs, feeds)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, v)
                                                             for n, v in zip(self.outputs, values)]))
            except Exception as err:  # noqa: BLE001 - this request's error; the model keeps serving
                kind = "input" if isinstance(err, (InputError, InvalidArgument)) else "internal"
                responses.append(pb_utils.InferenceResponse(
                    error=_error(Failure(first_line(err, with_type=True), kind))))
        return responses

    def finalize(self) -> None:
        self.session = None


def instance_gpu(args: dict) -> int | None:
    """The GPU of this model instance (an instance group of kind GPU places one on each GPU it names): the model
    must run there itself, Triton only tells it which (triton-inference-server/server#6124)."""
    if args.get("model_instance_kind") != "GPU":
        return None
    return int(args.get("model_instance_device_id") or 0)


def _input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def check_package(expected: str | None) -> None:
    """The server runs the asdm-export that started it: the backend stub's Python finds packages through its
    site-packages, not through the caller's PYTHONPATH, so a checkout run that way served the installed copy's
    model code."""
    from .repo import package_folder

    here = package_folder()
    if expected and Path(expected) != here:
        raise InputError(f"the server's Python loads asdm_export from {here}, not {expected} as the command that "
                         "started it (its packages come from its site-packages, not from PYTHONPATH): install "
                         "that one, e.g. pip install -e . in a checkout")


def _printable(request_id: str, limit: int = 64) -> str:
    """A client's request id as the log may show it: letters, digits and ``._:-`` (others as ``?``), cut to
    ``limit``. The server reads the log (``server._batches_open``): an id is text the client chose."""
    return re.sub(r"[^\w.:-]", "?", request_id or "", flags=re.ASCII)[:limit]


def _cancelled(request) -> bool:
    check = getattr(request, "is_cancelled", None)  # Triton >= 23.10
    return bool(check()) if check else False


def _error(failure: Failure):
    code = {"input": "INVALID_ARG", "cancelled": "CANCELLED", "unavailable": "UNAVAILABLE"}.get(failure.kind,
                                                                                               "INTERNAL")
    try:
        return pb_utils.TritonError(failure.message, getattr(pb_utils.TritonError, code))
    except (TypeError, AttributeError):  # older stubs take the message only
        return pb_utils.TritonError(failure.message)
