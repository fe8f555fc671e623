"""Serving: the text-to-image model on a real Triton Inference Server (the nvidia-pytriton wheel's), started on
free localhost ports with the tiny bundle; the deployment repository's files and its BLS loop."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from click.testing import CliRunner

from asdm_export.check.accuracy import image_psnr
from asdm_export.cli import main
from asdm_export.errors import Busy, Cancelled, InputError, MissingBackendError, StageError
from asdm_export.runtime.pipeline import AsdmPipeline, ImageRequest
from asdm_export.serve.model import MAX_PROMPT_CHARS, parse_rows, serve_requests

pytriton = pytest.importorskip("pytriton", reason="serving needs the [serve] extra (nvidia-pytriton)")
http = pytest.importorskip("tritonclient.http")

from asdm_export.serve import serve  # noqa: E402
from asdm_export.serve.client import Client, request_inputs  # noqa: E402
from asdm_export.serve.repo import read_config, write_triton_repo  # noqa: E402

STEPS = 4
DELAY_US = 500_000  # requests sent together fill one batch before the delay ends (a full batch leaves at once)
# the module's server samples with a scheduler other than the bundle's own (DDIM), one that draws noise in its
# steps: each request's own generator inside a batched loop
SERVED_SCHEDULER = "euler-a"


def metric(text: str, name: str, model: str = "asdm") -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{model="{model}"'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {model} not in the metrics")


def infer(url: str, inputs: list, timeout: float = 120.0):
    client = http.InferenceServerClient(url, network_timeout=timeout, connection_timeout=timeout)
    try:
        return client.infer("asdm", inputs)
    finally:
        client.close()


def tensor(name: str, value: np.ndarray, dtype: str):
    t = http.InferInput(name, list(value.shape), dtype)
    t.set_data_from_numpy(value)
    return t


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    s = serve(tiny_bundle, threads=1, delay_us=DELAY_US, exit_timeout=20, scheduler=SERVED_SCHEDULER,
              log_file=str(tmp_path_factory.mktemp("triton") / "server.log"))  # the log as a str: the API takes both
    yield s
    assert s.stop() == 0, s.failure()


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return AsdmPipeline.from_bundle(tiny_bundle)


def test_batched_requests_get_the_image_run_gives(server, tiny_bundle):
    """Two requests sent together are one denoising loop (one execution in the metrics); each gets the image
    of `run` with its own prompt, seed and guidance, and the server's --scheduler."""
    pipe = AsdmPipeline.from_bundle(tiny_bundle, scheduler=SERVED_SCHEDULER)
    asks = [dict(prompt="a red circle", seed=3, guidance_scale=7.5), dict(prompt="a blue square", seed=11,
                                                                          guidance_scale=4.0)]
    before = server.metrics()
    images = [None, None]

    def ask(i):
        with Client(server.url) as c:
            images[i] = c.generate(asks[i]["prompt"], steps=STEPS, seed=asks[i]["seed"],
                                   guidance_scale=asks[i]["guidance_scale"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for ask_, image in zip(asks, images):
        (expected,) = pipe(ask_["prompt"], steps=STEPS, seed=ask_["seed"], guidance_scale=ask_["guidance_scale"])
        assert image.shape == expected.shape == (128, 128, 3) and image.dtype == np.uint8
        assert image_psnr(image, expected) >= 40
    deadline = time.monotonic() + 30
    while True:  # Triton counts a request after its response is sent: on a loaded machine, a moment later
        after = server.metrics()
        done = metric(after, "nv_inference_request_success") - metric(before, "nv_inference_request_success")
        runs = metric(after, "nv_inference_exec_count") - metric(before, "nv_inference_exec_count")
        if done >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert (done, runs) == (2, 1)


def test_health_and_metrics(server):
    for path in ("/v2/health/ready", "/v2/health/live", "/v2/models/asdm/ready"):
        with urllib.request.urlopen(f"http://{server.url}{path}") as r:
            assert r.status == 200
    text = server.metrics()
    assert metric(text, "nv_inference_request_success") >= 0 and "nv_inference_queue_duration_us" in text


@pytest.mark.parametrize("inputs, needle", [
    (lambda: request_inputs("a red circle", steps=0), "steps must be from 1 to 1000"),
    (lambda: request_inputs("a red circle", steps=5000), "steps must be from 1 to 1000"),
    (lambda: request_inputs("a red circle", height=100), "height 100 is outside the graphs' range"),
    (lambda: request_inputs("x" * 10_000), "prompt has 10000 characters"),
    (lambda: [tensor("prompt", np.array([[b"a red circle"]], dtype=object), "BYTES"),
              tensor("steps", np.array([[4.0]], dtype=np.float32), "FP32")], "data-type"),
    (lambda: [tensor("seed", np.array([[1]], dtype=np.int64), "INT64")], "prompt"),
])
def test_bad_requests_get_one_line_and_the_server_keeps_serving(server, inputs, needle):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as err:
        infer(server.url, inputs())
    message = err.value.message()
    assert needle in message and "\n" not in message and "Traceback" not in message
    assert err.value.status() == "400"
    with Client(server.url) as c:
        assert c.generate("a red circle", steps=1).shape == (128, 128, 3)


def test_empty_payload_is_refused(server):
    body = json.dumps({"inputs": []}).encode()
    req = urllib.request.Request(f"http://{server.url}/v2/models/asdm/infer", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 400
    assert "prompt" in json.loads(err.value.read())["error"]
    with Client(server.url) as c:
        assert c.generate("a red circle", steps=1).shape == (128, 128, 3)


def test_the_grpc_client_gets_the_http_image_and_the_same_errors(server, tmp_path):
    """client --url grpc://HOST:PORT: the image HTTP gives, a refused request as one line (exit 2), and the
    HTTP port given for gRPC said as no gRPC server there."""
    grpc_url = f"grpc://{server.host}:{server.ports.grpc}"
    for url, name in ((server.url, "http.png"), (grpc_url, "grpc.png")):
        r = CliRunner().invoke(main, ["client", "--url", url, "-p", "a red circle", "--steps", "2", "--seed", "3",
                                      "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    from PIL import Image

    http_image, grpc_image = (np.asarray(Image.open(tmp_path / n)) for n in ("http.png", "grpc.png"))
    assert http_image.std() > 10 and np.array_equal(http_image, grpc_image)
    for url in (server.url, grpc_url):  # a timeout without end, or past what a deadline can hold: no deadline
        for timeout in (float("inf"), 1e14):
            with Client(url, timeout=timeout) as c:
                assert c.generate("a red circle", steps=1).shape == (128, 128, 3)
    for url, steps, needle in ((grpc_url, "1001", "the server refused the request: steps must be from 1 to 1000"),
                               (f"grpc://{server.url}", "1", "no Triton gRPC server answers")):
        r = CliRunner().invoke(main, ["client", "--url", url, "-p", "x", "--steps", steps, "--timeout", "10",
                                      "--out", str(tmp_path / "x.png")])
        assert r.exit_code == 2 and needle in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_a_client_that_disconnects_leaves_no_stuck_work(server):
    """gRPC (the project's client with a grpc:// address): the client's deadline cancels the request and the
    loop stops at its next step. HTTP (no cancellation in Triton's HTTP frontend): the loop runs out, and
    nothing stays pending."""
    from tritonclient.utils import InferenceServerException

    with Client(f"grpc://{server.host}:{server.ports.grpc}", timeout=1.5) as c:
        with pytest.raises(InputError, match=r"sent no image within 1.5 s; raise --timeout"):
            c.generate("a red circle", steps=900)
    with pytest.raises((InferenceServerException, OSError, TimeoutError)):
        infer(server.url, request_inputs("a red circle", steps=60), timeout=0.3)
    with Client(server.url) as c:  # served next, not stuck behind them
        assert c.generate("a blue square", steps=1).shape == (128, 128, 3)
    deadline = time.monotonic() + 60
    while metric(server.metrics(), "nv_inference_pending_request_count") > 0:
        assert time.monotonic() < deadline, "a request is still pending a minute after its client left"
        time.sleep(0.5)
    stopped = re.findall(r"cancelled at step (\d+) of 900", server.log_file.read_text())
    assert stopped and int(stopped[-1]) < 450, "the cancelled loop ran on"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_bundle, tmp_path, sig):
    """SIGTERM, and SIGHUP (a closed terminal killed serve and left its temporary folders behind)."""
    from asdm_export.serve.server import free_port

    port = free_port()
    temp = tmp_path / "temp"  # serve's temporary folders (repository, Triton's backend folder): gone at the end
    temp.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(temp)}
    proc = subprocess.Popen([sys.executable, "-m", "asdm_export.cli", "serve", "-e", str(tiny_bundle), "--port",
                             str(port), "--threads", "1", "--log", str(tmp_path / "log.txt")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    try:
        line = proc.stdout.readline()
        assert "serving" in line, line + proc.stdout.read()
        result = {}

        def ask():
            with Client(f"127.0.0.1:{port}") as c:
                result["image"] = c.generate("a red circle", steps=150, seed=5)

        t = threading.Thread(target=ask)
        t.start()
        time.sleep(1.0)  # in flight
        proc.send_signal(sig)
        t.join(timeout=120)
        assert result.get("image") is not None and result["image"].shape == (128, 128, 3)
        assert proc.wait(timeout=120) == 0, proc.stdout.read()
        assert "stopped" in proc.stdout.read()
        assert not list(temp.glob("asdm-*"))  # (ONNX Runtime leaves a session id file, .ses, of its own)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_folder_named_in_any_characters_is_served(tiny_bundle, tmp_path, pipe, monkeypatch):
    """The backend stub's Python encodes paths as ASCII: `serve` of '/.../日本' said it does not exist (exit 2).
    And the stubs' Python puts its current folder first on its path: started from a checkout, it ran the
    checkout's asdm_export, not the command's (here a package that has nothing, so the model cannot load)."""
    import shutil

    folder = tmp_path / "日本 bundle"
    shutil.copytree(tiny_bundle, folder)
    (tmp_path / "checkout" / "asdm_export").mkdir(parents=True)
    (tmp_path / "checkout" / "asdm_export" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path / "checkout")
    s = serve(folder, threads=1, exit_timeout=10)
    try:
        with Client(s.url) as c:
            image = c.generate("a red circle", steps=2, seed=4)
    finally:
        assert s.stop() == 0, s.failure()
    assert image_psnr(image, pipe("a red circle", steps=2, seed=4)[0]) >= 40


def test_the_server_refuses_to_run_another_copy_of_asdm_export(tmp_path):
    """The stub's Python does not see the caller's PYTHONPATH: a checkout run that way was served by the
    installed copy's model code, silently."""
    import asdm_export
    from asdm_export.serve.model import check_package

    check_package(str(Path(asdm_export.__file__).resolve().parent))
    check_package(None)  # a repository written by an earlier release
    with pytest.raises(InputError, match="the server's Python loads asdm_export from .* not .*elsewhere"):
        check_package(str(tmp_path / "elsewhere"))


def test_a_killed_serve_leaves_no_server_behind(tiny_bundle, tmp_path):
    from asdm_export.serve.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "asdm_export.cli", "serve", "-e", str(tiny_bundle), "--port",
                             str(port), "--threads", "1", "--log", str(tmp_path / "log.txt")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # a killed serve cannot remove its temporary folders: they go with tmp_path
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp_path)})
    try:
        assert "serving" in proc.stdout.readline()
    finally:
        proc.kill()  # SIGKILL: serve cannot forward anything; the kernel tells the server
        proc.wait()
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/live", timeout=1)
        except (urllib.error.URLError, OSError):
            break  # nothing listens any more
        assert time.monotonic() < deadline, "the server outlived `asdm-export serve` by a minute"
        time.sleep(0.5)


def test_serving_batches_only_what_one_loop_can_share(pipe):
    """Grouped by steps and size, chunked by the batch; a bad or cancelled request answers alone."""
    rows = {0: [ImageRequest("a", steps=2, seed=1)], 1: [ImageRequest("b", steps=3, seed=2)],
            2: [ImageRequest("c", steps=2, seed=3), ImageRequest("d", steps=2, seed=4)],
            3: [ImageRequest("e", steps=0)], 4: [ImageRequest("f", steps=2, seed=5)],
            5: [ImageRequest("g", steps=2, height=64, width=64), ImageRequest("h", steps=2, height=128, width=64)]}
    loops = []
    original = pipe.generate
    pipe.generate = lambda requests, **kw: loops.append(len(requests)) or original(requests, **kw)
    try:
        out = serve_requests(pipe, rows, max_batch=2, cancelled=lambda i: i == 4)
    finally:
        pipe.generate = original
    assert sorted(loops) == [1, 1, 2]  # steps 2: a,c | d (f, cancelled, is dropped from its chunk); steps 3: b
    assert out[3].message.startswith("steps must be from 1 to 1000") and out[3].kind == "input"
    assert out[4].message.startswith("cancelled") and out[4].kind == "cancelled"
    assert out[5].message.startswith("the rows of one request must share height and width")  # not one failed batch
    for i, r in ((0, rows[0][0]), (2, rows[2][1])):
        (alone,) = pipe(r.prompt, steps=r.steps, seed=r.seed)
        got = out[i][0] if i == 0 else out[i][1]
        assert image_psnr(got, alone) >= 40


def test_request_rows_are_checked():
    ok = parse_rows({"prompt": np.array([[b"a"], [b"b"]], dtype=object), "seed": np.array([[1], [2]])})
    assert [(r.prompt, r.seed) for r in ok] == [("a", 1), ("b", 2)]
    unseeded = parse_rows({"prompt": np.array([[b"a"], [b"a"]], dtype=object)})
    assert [r.seed for r in unseeded] == [0, 1]  # as `run`: image i seed 0 + i, not one image twice
    with pytest.raises(InputError, match="no prompt"):
        parse_rows({"prompt": None})
    with pytest.raises(InputError, match="not UTF-8"):
        parse_rows({"prompt": np.array([[b"\xff"]], dtype=object)})
    with pytest.raises(InputError, match="shape"):
        parse_rows({"prompt": np.array([[b"a"]], dtype=object), "seed": np.array([[1], [2]])})
    with pytest.raises(InputError, match="no prompt"):  # 0-d: what an in-process caller may pass
        parse_rows({"prompt": np.array(b"a", dtype=object)})
    with pytest.raises(InputError, match="shape"):  # an optional input with no rows
        parse_rows({"prompt": np.array([[b"a"]], dtype=object), "seed": np.zeros((0, 1), np.int64)})
    with pytest.raises(InputError, match="shape"):  # two values in one row (a reshape error, not a ValueError)
        parse_rows({"prompt": np.array([[b"a"]], dtype=object), "seed": np.array([[1, 2]])})
    longest = "x" * MAX_PROMPT_CHARS
    assert parse_rows({"prompt": np.array([[longest.encode()]], dtype=object)})[0].prompt == longest
    with pytest.raises(InputError, match=f"the limit is {MAX_PROMPT_CHARS}"):
        parse_rows({"prompt": np.array([[longest.encode() + b"x"]], dtype=object)})
    for height in (2**31, -(2**31) - 1, -(2**32) + 64):  # int32 would wrap the last one around to 64
        with pytest.raises(InputError, match="does not fit the model's INT32 input"):
            request_inputs("a", height=height)


def test_the_loop_models_instance_kind_and_batch(tiny_bundle):
    from asdm_export.artifacts import read_manifest
    from asdm_export.runtime.folders import loop_batch_limit
    from asdm_export.serve.repo import check_max_batch, instance_kind

    assert [instance_kind(*args) for args in (("ort", "cpu", None), ("ort", "cuda", None), ("ort", "trt", None),
                                              ("trt", None, None), ("torch", None, "cpu"), ("torch", None, "cuda:1"))
            ] == ["cpu", "gpu", "gpu", "gpu", "cpu", "gpu"]
    manifest = read_manifest(tiny_bundle, "bundle")
    limit = loop_batch_limit(manifest)  # batch 4 graphs, guidance doubles: 2 requests
    assert limit == 2 and check_max_batch(manifest, None) == limit and check_max_batch(manifest, limit) == limit
    for too_many in (0, limit + 1):
        with pytest.raises(InputError, match="--max-batch"):
            check_max_batch(manifest, too_many)


@pytest.mark.parametrize("error, kind, code", [
    (InputError("a size outside the graphs"), "input", "INVALID_ARG"),
    (StageError("graph model unet_full: CUDA out of memory"), "internal", "INTERNAL"),
    (MissingBackendError("ONNX Runtime here has no CUDAExecutionProvider"), "unavailable", "UNAVAILABLE"),
    (RuntimeError("boom"), "internal", "INTERNAL"),
    (Cancelled("cancelled at step 3 of 9: the client closed the request"), "cancelled", "CANCELLED"),
])
def test_a_failure_on_the_servers_side_is_not_answered_as_the_clients(pipe, monkeypatch, error, kind, code):
    """A graph model that fails (BLS), a missing backend, a bug: HTTP 500 / 503, not 400 'bad input'."""
    from asdm_export.serve import model as serve_model

    def fail(requests, **kw):
        raise error

    monkeypatch.setattr(pipe, "generate", fail)
    (failure,) = serve_requests(pipe, {0: [ImageRequest("a", steps=2)]}, max_batch=2).values()
    assert failure.kind == kind and str(error) in failure.message

    class TritonError:  # the stub's codes, as triton_python_backend_utils names them
        INTERNAL, INVALID_ARG, UNAVAILABLE, CANCELLED = range(4)

        def __init__(self, message, code):
            self.message, self.code = message, code

    monkeypatch.setattr(serve_model, "pb_utils", type("pb", (), {"TritonError": TritonError}), raising=False)
    assert serve_model._error(failure).code == getattr(TritonError, code)


def test_each_gpu_instance_runs_on_its_own_gpu(tiny_bundle, monkeypatch):
    """Triton places an instance on a GPU and only tells the model which: TensorRT, ONNX Runtime's GPU providers
    and the PyTorch runtime must each open on that device (here GPU 3 of a CPU machine, the backends stubbed
    where they would touch a GPU)."""
    import onnxruntime as ort

    from asdm_export.runtime import folders, program_backend, runners, trt_backend
    from asdm_export.serve import model as serve_model

    opened = []
    monkeypatch.setattr(trt_backend, "TrtBackend", lambda folder, device=None: opened.append(("trt", device)))
    monkeypatch.setattr(program_backend.ProgramBackend, "from_bundle",
                        classmethod(lambda cls, folder, device, dtype: opened.append(("torch", device))))
    monkeypatch.setattr(program_backend.ProgramBackend, "from_engines",
                        classmethod(lambda cls, folder, device, **kw: opened.append(("torch engines", device))))
    monkeypatch.setattr(folders, "check_backend_choice", lambda folder, manifest, backend, *a: backend)

    class Session:
        def __init__(self, path, sess_options, providers):
            opened.append(("ort", providers[0]))
            self.ep = providers[0][0] if isinstance(providers[0], tuple) else providers[0]

        def get_providers(self):
            return [self.ep]

        def get_outputs(self):
            return [SimpleNamespace(name=o["name"]) for o in manifest["graphs"][0]["outputs"]]

    monkeypatch.setattr(ort, "InferenceSession", Session)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    from asdm_export.artifacts import read_manifest

    manifest = read_manifest(tiny_bundle, "bundle")
    make = folders.make_backend
    make(tiny_bundle, manifest, "trt", gpu=3)
    make(tiny_bundle, manifest, "torch", device="cuda", gpu=3)
    make(tiny_bundle, manifest, "ort", provider="cuda", gpu=3).session("unet")
    runners.ort_session(tiny_bundle / manifest["graphs"][0]["file"], "cuda")  # no instance: ORT's own default
    # a CUDA torch engine folder run without --device (its own device), or with an explicit index (kept)
    cuda_programs = {"kind": "engines", "backend": "torch", "platform": {"device": "cuda"}}
    make(tiny_bundle, cuda_programs, "torch", gpu=3)
    make(tiny_bundle, cuda_programs, "torch", device="cuda:1", gpu=3)
    make(tiny_bundle, {**cuda_programs, "platform": {"device": "cpu"}}, "torch", gpu=3)
    assert opened == [("trt", 3), ("torch", "cuda:3"), ("ort", ("CUDAExecutionProvider", {"device_id": 3})),
                      ("ort", "CUDAExecutionProvider"), ("torch engines", "cuda:3"), ("torch engines", "cuda:1"),
                      ("torch engines", None)]

    assert serve_model.instance_gpu({"model_instance_kind": "GPU", "model_instance_device_id": "3"}) == 3
    assert serve_model.instance_gpu({"model_instance_kind": "CPU", "model_instance_device_id": "0"}) is None


def test_the_deployment_loop_defaults_to_a_size_its_engines_take(tiny_bundle, pipe):
    """UNet models built for one static size only (the deployment repository of a static engine folder): a
    request without a size gets that size, as `run` and `serve` do on the folder itself."""
    from asdm_export.artifacts import read_manifest
    from asdm_export.serve.model import TritonGraphBackend

    manifest = read_manifest(tiny_bundle, "bundle")
    static = {"sample": [2, 4, 8, 8], "timestep": [2], "encoder_hidden_states": [2, 77, 32]}
    models = {g["name"]: [{"model": g["name"], "profile": None}] for g in manifest["graphs"]}
    models["unet"] = [{"model": "unet_0", "profile": {k: {"min": v, "opt": v, "max": v} for k, v in static.items()}}]
    loop = AsdmPipeline(tiny_bundle, manifest, TritonGraphBackend(manifest, models))
    assert pipe.default_size() == (128, 128) and loop.default_size() == (64, 64)
    assert loop.resolve(ImageRequest("a")).height == 64


def test_steps_the_scheduler_cannot_take_are_refused_not_crashed(pipe):
    """SD1.5's DDIM (leading spacing, steps_offset 1) at 1000 steps gives timestep 1000: past its noise table."""
    assert pipe.resolve(ImageRequest("a", steps=999)).steps == 999
    with pytest.raises(InputError, match="gives timestep 1000, past its 1000 training timesteps"):
        pipe.resolve(ImageRequest("a", steps=1000))


def test_the_client_refuses_values_its_input_types_cannot_hold():
    with pytest.raises(InputError, match="height 4294967360 does not fit the model's INT32 input"):
        request_inputs("a", height=2**32 + 64)
    assert request_inputs("a", seed=2**32 - 1)  # SEED's range fits INT64
    with pytest.raises(InputError, match="not UTF-8 text"):  # bytes a shell passed, kept as surrogates
        request_inputs("a \udcff fox")


def test_a_full_queue_and_a_long_wait_are_refused_as_busy_and_never_run(tiny_bundle, tmp_path):
    """serve --max-queue 2: with one request running and two waiting (Triton's pending count says so), the next
    is refused at once (client exit 75, try again later). A waiting HTTP request is dropped from the queue when
    its client's --timeout runs out (Triton's HTTP front end cannot see the client leave): never computed. The
    one left waiting runs once the first ends (its gRPC deadline stopped it)."""
    s = serve(tiny_bundle, threads=1, max_batch=1, max_queue=2, exit_timeout=10)
    results = {}

    def ask(label, url, timeout, **kw):
        try:
            with Client(url, timeout=timeout) as c:
                results[label] = c.generate("a red circle", **kw).shape
        except (InputError, Busy) as err:
            results[label] = err

    def started(count):
        deadline = time.monotonic() + 60
        while s.log_file.read_text().count("asdm: executing") < count:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    try:
        running = threading.Thread(target=ask, args=("running", f"grpc://{s.host}:{s.ports.grpc}", 8),
                                   kwargs=dict(steps=999, height=256, width=256))
        running.start()
        started(1)
        waiting = threading.Thread(target=ask, args=("waiting", s.url, 120), kwargs=dict(steps=2))
        gives_up = threading.Thread(target=ask, args=("gives up", s.url, 3), kwargs=dict(steps=2))
        waiting.start()
        gives_up.start()
        deadline = time.monotonic() + 30
        while s.pending() != 2:  # both wait in the queue
            assert time.monotonic() < deadline, s.pending()
            time.sleep(0.05)
        r = CliRunner().invoke(main, ["client", "--url", s.url, "-p", "x", "--steps", "2",
                                      "--out", str(tmp_path / "x.png")])
        assert r.exit_code == 75 and "is busy: its queue is full (serve --max-queue); try again later" in r.output
        assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()
        for t in (gives_up, running, waiting):
            t.join(timeout=120)
        # the client's own timeout or the server's refusal, whichever came first: the same moment
        assert re.search("sent no image within 3 s|waited in its queue past its timeout", str(results["gives up"]))
        assert isinstance(results["running"], InputError) and results["waiting"] == (128, 128, 3), results
        assert s.log_file.read_text().count("asdm: executing") == 2  # the refused requests never ran
    finally:
        assert s.stop() == 0, s.failure()


def test_the_queue_settings_reach_the_loop_models_config(tiny_bundle, tmp_path):
    from asdm_export.serve.repo import QUEUE_TIMEOUT_MAX_US, write_serving_repo

    r = CliRunner().invoke(main, ["triton-repo", "--engines", str(tiny_bundle), "--out", str(tmp_path / "repo"),
                                  "--max-queue", "4", "--queue-timeout", "2.5", "--delay-ms", "5"])
    assert r.exit_code == 0, r.output
    batching = read_config(tmp_path / "repo" / "asdm" / "config.pbtxt").dynamic_batching
    assert batching.max_queue_delay_microseconds == 5000  # triton-repo had no --delay-ms: 2 ms, said nowhere
    policy = batching.default_queue_policy
    assert (policy.max_queue_size, policy.default_timeout_microseconds) == (4, 2_500_000)
    assert policy.allow_timeout_override and policy.timeout_action == 0  # REJECT
    manifest = json.loads((tmp_path / "repo" / "manifest.json").read_text())
    assert (manifest["max_queue"], manifest["queue_timeout_us"]) == (4, 2_500_000)
    # by default no bound of the server's own; a client's timeout still applies, which needs a default timeout
    write_serving_repo(tiny_bundle, tmp_path / "serving", max_batch=2)
    write_serving_repo(tiny_bundle, tmp_path / "serving", max_batch=1)  # again: its link to the folder is replaced
    assert (tmp_path / "serving" / "asdm" / "1" / "engines").resolve() == tiny_bundle.resolve()
    config = read_config(tmp_path / "serving" / "asdm" / "config.pbtxt")
    policy = config.dynamic_batching.default_queue_policy
    assert (policy.max_queue_size, policy.default_timeout_microseconds) == (0, QUEUE_TIMEOUT_MAX_US)
    assert policy.allow_timeout_override and config.max_batch_size == 1
    with pytest.raises(InputError, match="a timeout of 0 to 86400 s"):
        write_serving_repo(tiny_bundle, tmp_path / "bad", max_queue=1, queue_timeout_us=-1)
    # a lone request waits out the batcher's delay: a shorter queue timeout would refuse every request as busy
    with pytest.raises(InputError, match=r"--queue-timeout 0.5 s is not longer than the batcher's delay \(1000 ms\)"):
        write_serving_repo(tiny_bundle, tmp_path / "bad", delay_us=1_000_000, queue_timeout_us=500_000)
    write_serving_repo(tiny_bundle, tmp_path / "one", max_batch=1, delay_us=1_000_000, queue_timeout_us=500_000)
    for args in (["--max-queue", "10000000000"], ["--queue-timeout", "0.0000001"]):  # the latter: 1 us, not 0
        r = CliRunner().invoke(main, ["triton-repo", "--engines", str(tiny_bundle), "--out", str(tmp_path / "x"),
                                      *args])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output


def test_deployment_repository_matches_the_manifest_and_its_loop_serves(tiny_bundle, pipe, tmp_path):
    """Every graph a model with the manifest's names, shapes and dtypes (parsed with Triton's schema); the
    `python` platform's repository, served here, runs the loop over the graph models (BLS) to `run`'s image."""
    from tritonclient.grpc import model_config_pb2 as mc

    from asdm_export.artifacts import read_manifest
    from asdm_export.serve.repo import DTYPES
    from asdm_export.serve.server import Ports, TritonServer

    manifest = read_manifest(tiny_bundle, "bundle")
    record = write_triton_repo(tiny_bundle, tmp_path / "ort", instances=2, gpus=[0, 1])
    assert record["platform"] == "onnxruntime_onnx" and record["max_batch"] == 2
    for g in manifest["graphs"]:
        c = read_config(tmp_path / "ort" / g["name"] / "config.pbtxt")
        assert c.platform == "onnxruntime_onnx" and (tmp_path / "ort" / g["name"] / "1" / "model.onnx").is_file()
        assert [(i.name, list(i.dims)) for i in c.input] == [
            (t["name"], [d if isinstance(d, int) else -1 for d in t["shape"]]) for t in g["inputs"]]
        assert [o.name for o in c.output] == [t["name"] for t in g["outputs"]]
        assert [mc.DataType.Name(x.data_type) for x in (*c.input, *c.output)] == [
            DTYPES[t["dtype"]] for t in (*g["inputs"], *g["outputs"])]
        assert c.instance_group[0].count == 2 and list(c.instance_group[0].gpus) == [0, 1]
    loop = read_config(tmp_path / "ort" / "asdm" / "config.pbtxt")
    assert loop.backend == "python" and loop.max_batch_size == 2 and loop.parameters["graphs"].string_value == "triton"

    # an engine folder whose UNet has two engines (static batch 2 at 16x16 latents, and any shape): one model
    # each, the loop picks the static one for this request's shapes
    engines = engine_folder_with_two_unet_engines(tiny_bundle, manifest, tmp_path / "engines")
    record = write_triton_repo(engines, tmp_path / "py", platform="python", scheduler="dpm++2m")
    assert {"unet_0", "unet_1", "text_encoder", "vae_decoder"} <= set(record["models"])
    written = json.loads((tmp_path / "py" / "asdm" / "1" / "pipeline" / "scheduler" / "scheduler_config.json")
                         .read_text())
    assert record["scheduler"] == "dpm++2m" and written["_class_name"] == "DPMSolverMultistepScheduler"
    static = read_config(tmp_path / "py" / "unet_0" / "config.pbtxt")
    assert [list(i.dims) for i in static.input] == [[2, 4, 16, 16], [2], [2, 77, 32]]
    assert static.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and "provider" not in static.parameters
    # --gpus with the python platform: ONNX Runtime's CUDA provider on each instance's GPU (it put every
    # instance on the CPU, and the manifest still said gpus [0, 1])
    write_triton_repo(engines, tmp_path / "py-gpu", platform="python", gpus=[0, 1])
    for gpus in ([], [0, 0], [-1]):  # the Python API checks what the CLI did (an empty list wrote KIND_GPU on no GPU)
        with pytest.raises(InputError, match="distinct GPU ids"):
            write_triton_repo(engines, tmp_path / "bad-gpus", gpus=gpus)
    on_gpu = read_config(tmp_path / "py-gpu" / "unet_0" / "config.pbtxt")
    assert on_gpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU and list(on_gpu.instance_group[0].gpus) == \
        [0, 1] and on_gpu.parameters["provider"].string_value == "cuda"
    scratch = tmp_path / "scratch"  # the server's temporary folders land here, and go when it stops
    scratch.mkdir()
    with mock.patch.object(tempfile, "tempdir", str(scratch)), \
            TritonServer(tmp_path / "py", Ports.free(), log_file=tmp_path / "log.txt") as s, Client(s.url) as c:
        image = c.generate("a red circle", steps=STEPS, seed=3)
        counts = {m: metric(s.metrics(), "nv_inference_exec_count", m) for m in ("unet_0", "unet_1")}
    assert not list(scratch.iterdir())
    (expected,) = AsdmPipeline.from_bundle(tiny_bundle, scheduler="dpm++2m")("a red circle", steps=STEPS, seed=3)
    assert image_psnr(image, expected) >= 40 and image_psnr(image, pipe("a red circle", steps=STEPS, seed=3)[0]) < 40
    assert counts == {"unet_0": STEPS, "unet_1": 0}


def engine_folder_with_two_unet_engines(bundle, manifest, out):
    import shutil

    shutil.copytree(bundle, out)
    static = {"sample": [2, 4, 16, 16], "timestep": [2], "encoder_hidden_states": [2, 77, 32]}
    for g in manifest["graphs"]:
        g["engines"] = [{"file": g["file"], "data_files": [], "profile": None}]
        if g["name"] == "unet":
            g["engines"].insert(0, {"file": g["file"], "data_files": [],
                                    "profile": {k: {"min": v, "opt": v, "max": v} for k, v in static.items()}})
    (out / "manifest.json").write_text(json.dumps({**manifest, "kind": "engines", "backend": "ort", "spec": {},
                                                   "bundle": {"path": str(bundle), "manifest_sha256": ""}}))
    return out


@pytest.mark.parametrize("args, code, needle", [
    (["serve", "--max-batch", "3"], 2, "--max-batch 3 needs UNet graphs of batch 6"),
    # said before a server starts
    (["serve", "--backend", "trt"], 2, "holds a bundle's ONNX graphs, not TensorRT engines"),
    (["triton-repo", "--platform", "tensorrt_plan", "--out", "{tmp}/repo"], 2,
     "not TensorRT engines; make the repository of its ONNX graphs with --platform onnxruntime_onnx or python"),
    (["client", "--url", "127.0.0.1:{port}", "-p", "x", "--out", "{tmp}/x.png"], 2, "no Triton server answers"),
    (["client", "--url", "ftp://127.0.0.1:{port}", "-p", "x", "--out", "{tmp}/x.png"], 2, "is not a server address"),
    (["client", "--url", "grpc://127.0.0.1:{port}", "-p", "x", "--out", "{tmp}/x.png"], 2,
     "no Triton gRPC server answers"),
    (["client", "--url", "grpc://127.0.0.1", "-p", "x", "--out", "{tmp}/x.png"], 2, "is not a server address"),
    (["client", "--url", "grpc://u@127.0.0.1:{port}", "-p", "x", "--out", "{tmp}/x.png"], 2, "is not a server address"),
    (["client", "--url", "grpc://no-such-host.invalid:8001", "-p", "x", "--out", "{tmp}/x.png"], 2,
     "no Triton gRPC server answers"),
    (["client", "--url", "http://::bad", "-p", "x", "--out", "{tmp}/x.png"], 2, "is not a server address"),
    (["triton-repo", "--gpus", "0,0", "--out", "{tmp}/repo"], 2, "distinct GPU ids"),
    (["triton-repo", "--gpus", "1024", "--out", "{tmp}/repo"], 2, "distinct GPU ids"),
    (["triton-repo", "--gpus", "0,x", "--out", "{tmp}/repo"], 2, "list of GPU ids"),
    (["serve", "--delay-ms", "nan"], 2, "is not a finite number"),
    # beyond these a server died at start: Triton's int32 flag printed its usage (exit 5), 100000 threads were
    # a std::bad_alloc in the model instance
    (["serve", "--exit-timeout", "2147483648"], 2, "is not in the range 10<=x<=86400"),
    (["serve", "--threads", "100000"], 2, "is not in the range 0<=x<=1024"),
    (["serve", "--instances", "1025"], 2, "is not in the range 1<=x<=1024"),
    (["triton-repo", "--instances", "1025", "--out", "{tmp}/repo"], 2, "is not in the range 1<=x<=1024"),
])
def test_cli_errors_are_one_line(tiny_bundle, tmp_path, args, code, needle):
    from asdm_export.serve.server import free_port

    args = [a.format(tmp=tmp_path, port=free_port()) for a in args]
    if args[0] != "client":
        args[1:1] = ["--engines", str(tiny_bundle)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == code, r.output
    assert needle in r.output and "Traceback" not in r.output
    assert not (tmp_path / "repo").exists() and not (tmp_path / "x.png").exists()


def test_the_clients_errors_by_protocol():
    """What each protocol's failures become (the gRPC messages as grpc reported them): a server that cannot be
    reached or a name that does not resolve is the user's to fix (2), a server that went away mid-call is a
    failure (5), a full queue or a long wait is busy (75)."""
    refused = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:8399: Failed to connect " \
              "to remote host: Connection refused"
    cases = [("grpc", "StatusCode.UNAVAILABLE", refused, InputError, "no Triton gRPC"),
             ("grpc", "StatusCode.UNAVAILABLE", "DNS resolution failed for no-such-host.invalid:8001", InputError,
              "no Triton gRPC"),
             ("grpc", "StatusCode.UNAVAILABLE", "Stream removed (Socket closed)", StageError, "closed the connection"),
             ("grpc", "StatusCode.UNAVAILABLE", "serving on the GPU needs an NVIDIA GPU", StageError,
              "failed the request (UNAVAILABLE)"),
             ("grpc", "StatusCode.INVALID_ARGUMENT", "steps must be from 1 to 1000", InputError, "refused the request"),
             ("grpc", "StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", InputError, "sent no image within"),
             ("grpc", "StatusCode.UNIMPLEMENTED", "unknown service", InputError, "the gRPC port (default 8001)"),
             ("http", "503", "[request id: <id_unknown>] Exceeds maximum queue size", Busy, "its queue is full"),
             ("grpc", "StatusCode.UNAVAILABLE", "Request timeout expired", Busy, "waited in its queue"),
             ("http", "503", "model backend unavailable", StageError, "failed the request (503)"),
             ("http", "501", "Unsupported method", InputError, "the HTTP port (default 8000)")]
    clients = {p: Client("grpc://127.0.0.1:1" if p == "grpc" else "127.0.0.1:1") for p in ("http", "grpc")}
    for protocol, status, message, kind, needle in cases:
        err = clients[protocol]._failure(status, message)
        assert type(err) is kind and needle in str(err), (protocol, status, str(err))
    assert Busy("x").exit_code == 75


def test_a_client_pointed_at_a_web_server_that_is_not_triton_says_so(tmp_path):
    """Another HTTP server on the port (e.g. the metrics one): the wrong port, said in one line, exit 2."""
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):  # answers POST with 501
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = CliRunner().invoke(main, ["client", "--url", f"127.0.0.1:{server.server_port}", "-p", "x",
                                      "--out", str(tmp_path / "x.png"), "--timeout", "10"])
    finally:
        server.shutdown()
    assert r.exit_code == 2 and "does not serve Triton's inference protocol" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_an_http_client_pointed_at_a_grpc_port_says_so(tmp_path):
    """A gRPC server answers an HTTP/1.1 request with HTTP/2 frames: it was "the server closed the connection
    (HTTPParseError)", exit 5, as if the server had failed."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x64")  # HTTP/2 SETTINGS
            conn.recv(65536)

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        r = CliRunner().invoke(main, ["client", "--url", f"127.0.0.1:{port}", "-p", "x", "--out",
                                      str(tmp_path / "x.png"), "--timeout", "10"])
    finally:
        listener.close()
    assert r.exit_code == 2 and "does not answer in HTTP/1.1 (HTTPParseError): is it the gRPC port?" in r.output, \
        r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "x.png").exists()


def test_a_client_whose_server_does_not_answer_in_time_says_timeout(tmp_path):
    """A server that takes the connection but sends nothing within --timeout: said as a timeout, not as 'no
    server answers'."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        r = CliRunner().invoke(main, ["client", "--url", f"127.0.0.1:{listener.getsockname()[1]}", "-p", "x",
                                      "--out", str(tmp_path / "x.png"), "--timeout", "1"])
    assert r.exit_code == 2 and "sent no image within 1 s; raise --timeout" in r.output, r.output
    assert not (tmp_path / "x.png").exists()


def test_serving_on_a_gpu_without_one_is_one_line_before_any_server_starts(tiny_bundle):
    from asdm_export.runtime.runners import gpu_present

    if gpu_present():
        pytest.skip("this machine has an NVIDIA GPU and driver")
    for args in (["--provider", "cuda"], ["--backend", "torch", "--device", "cuda"]):
        r = CliRunner().invoke(main, ["serve", "--engines", str(tiny_bundle), *args])
        assert r.exit_code == 3 and "needs an NVIDIA GPU and its driver" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1


def test_a_log_serve_cannot_write_is_one_line_and_leaves_no_temporary_folders(tiny_bundle, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    for log, needle in ((tmp_path / "missing" / "x.log", "does not exist"),
                        (tmp_path, "is a folder; give the path of a file")):
        r = CliRunner().invoke(main, ["serve", "--engines", str(tiny_bundle), "--log", str(log)])
        assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not list(scratch.iterdir()), list(scratch.iterdir())


def test_two_graphs_that_would_share_a_triton_model_are_refused():
    """A UNet named `asdm` (bundles of earlier releases allowed it) had its graph model merged into the loop's
    folder, and the loop then called itself on every request (HTTP 500); `a.full` and a UNet `a_full` map to
    one name as well, and so do a graph with two engines and a UNet named like the first one's model."""
    from asdm_export.serve.repo import check_model_names, model_names

    check_model_names({"graphs": [{"name": "unet.full"}, {"name": "unet.inherit"}, {"name": "text_encoder"}]})
    assert model_names({"name": "unet.full", "engines": [{}, {}]}) == ["unet_full_0", "unet_full_1"]
    for graphs, needle in (([{"name": "unet"}, {"name": "asdm"}], "graph asdm and the denoising loop"),
                           ([{"name": "a.full"}, {"name": "a_full"}], "graph a_full and graph a.full"),
                           ([{"name": "u", "engines": [{}, {}]}, {"name": "u_0"}], "model 'u_0'")):
        with pytest.raises(InputError, match=re.escape(needle)):
            check_model_names({"graphs": graphs})


def test_a_log_inside_the_served_folder_is_refused_before_it_is_opened(tiny_bundle, tmp_path):
    """The log is truncated as the server starts: `--log BUNDLE/graphs/unet.onnx` replaced the graph with
    Triton's log (13.9 MB became 10 KB), and a new file would change the folder being served."""
    import shutil

    from asdm_export.artifacts import sha256_file

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    graph = bundle / "graphs" / "unet.onnx"
    before = sha256_file(graph)
    for log in (graph, bundle / "serve.log", bundle / "graphs"):
        r = CliRunner().invoke(main, ["serve", "--engines", str(bundle), "--log", str(log)])
        said = "is a folder" if log.is_dir() else "is inside the served folder"
        assert r.exit_code == 2 and said in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert sha256_file(graph) == before and not (bundle / "serve.log").exists()
    # what can be opened is taken, as before the check: checked here without a server
    from asdm_export.serve.server import check_log_file

    for fine in (Path("/dev/null"), Path("/dev/fd/2"), tmp_path / "triton.log"):
        check_log_file(fine, bundle)


def test_serve_without_triton_is_the_missing_backend_exit(tiny_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytriton.utils.distribution", None)
    r = CliRunner().invoke(main, ["serve", "--engines", str(tiny_bundle)])
    assert r.exit_code == 3 and "pip install 'asdm-export[serve]'" in r.output


def test_a_failed_start_names_the_models_error_not_a_cpu_notice(tmp_path):
    """Triton logs CUDA notices as errors on a CPU machine; the line said is the model's load failure, and an
    InputError raised while loading is the bad-input exit."""
    from asdm_export.serve.server import TritonServer

    log = tmp_path / "tritonserver.log"
    log.write_text('E1206 04:17:52 pinned_memory_manager.cc:170] "CudaDriverHelper has not been initialized."\n'
                   "E1206 04:17:52 model_lifecycle.cc:642] \"failed to load 'asdm' version 1: Internal: InputError: "
                   "ONNX Runtime cannot load 'x.onnx'.\\n\\nAt:\\n  runners.py(81): ort_session\\n\"\n")
    server = TritonServer(tmp_path, None, log_file=log)
    said = server.failure()
    assert "failed to load 'asdm'" in said and "InputError: ONNX Runtime cannot load 'x.onnx'" in said, said
    assert "CudaDriverHelper" not in said and "At:" not in said and server.failed_on_input()
    log.write_text('E1206 04:17:52 pinned_memory_manager.cc:170] "CudaDriverHelper has not been initialized."\n')
    assert server.failure() == f"see {log}" and not server.failed_on_input()


def test_sigterm_with_an_idle_client_connection_still_exits_0(tiny_bundle, tmp_path):
    """A client that keeps its keep-alive connection open (tritonclient's does) holds Triton's HTTP drain for
    the whole exit timeout, after which Triton exits 1 on 'Exit timeout expired' with no request in flight:
    serve says stopped and exits 0. A request still in flight then is a failure (the log's count says which)."""
    from asdm_export.serve.server import TritonServer, free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "asdm_export.cli", "serve", "-e", str(tiny_bundle), "--port",
                             str(port), "--threads", "1", "--exit-timeout", "10",
                             "--log", str(tmp_path / "log.txt")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert "serving" in proc.stdout.readline()
        with Client(f"127.0.0.1:{port}") as c:
            c.generate("a red circle", steps=1)  # done; the connection stays open, idle
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0, proc.stdout.read()
        assert "stopped" in proc.stdout.read()
        assert "Exit timeout expired" in (tmp_path / "log.txt").read_text()  # what Triton itself made of it
    finally:
        if proc.poll() is None:
            proc.kill()


def test_drained_reads_the_batches_from_the_models_own_log_lines(tmp_path):
    """Whether a stop cut a batch off, from Triton's log: its own count of in-flight inferences, and the lines
    the ``asdm`` model writes as a batch starts and ends."""
    from asdm_export.serve.server import TritonServer

    log = tmp_path / "flight.log"
    log.write_text('I1206 server.cc:321] "Timeout 0: Found 1 model versions that have in-flight inferences"\n'
                   'E1206 main.cc:535] "failed to stop server: Internal - Exit timeout expired. '
                   'Exiting immediately."\n')
    assert not TritonServer(tmp_path, None, log_file=log).drained()
    # Triton counts 0 while a Python-backend model runs a batch: the model's own lines say one was open
    expired = 'I1206 server.cc:321] "Timeout 0: Found 0 model versions that have in-flight inferences"\n' \
              'E1206 main.cc:535] "failed to stop server: Internal - Exit timeout expired. Exiting immediately."\n'
    log.write_text('I1206 model.py:1] "asdm: executing 1 request(s)"\nI1206 model.py:1] asdm: executed 1 request(s)\n'
                   'I1206 model.py:1] "asdm: executing 2 request(s) on asdm_0_0"\n' + expired)
    assert not TritonServer(tmp_path, None, log_file=log).drained()
    log.write_text('I1206 model.py:1] "asdm: executing 1 request(s)"\nI1206 model.py:1] asdm: executed 1 request(s)\n'
                   + expired)
    assert TritonServer(tmp_path, None, log_file=log).drained()
    # a gRPC request id is the client's text: one that reads like a batch's line, logged as its request is
    # cancelled, made a clean stop exit 5 ("a batch was running")
    from asdm_export.serve.model import _printable

    said = _printable('x" asdm: executing 1 request(s) on asdm_0_0\n] "asdm: executing 1 request(s)' + "z" * 99)
    assert said.startswith("x??asdm:?executing?1?request?s??on?asdm_0_0??") and len(said) == 64
    log.write_text(f'I1206 model.py:209] "asdm: request {said}: cancelled"\n'
                   'I1206 model.py:209] "asdm: request asdm: executing 1 request(s) on x: cancelled"\n' + expired)
    assert TritonServer(tmp_path, None, log_file=log).drained()


def live_in_group(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (a killed orphan stays one until init reaps it)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, pgrp, ...
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(stat.parent.name))
    return live


def test_a_stop_that_cuts_off_a_running_batch_fails_and_leaves_no_process(tiny_bundle, tmp_path):
    """The exit timeout running out mid-batch is a failed stop that says so (it was 'in-flight requests
    finished', exit 0), the client gets one line, and the backend stub that Triton abandoned is killed
    (it ran on, holding its memory, after the server exited)."""
    from asdm_export.serve.server import TritonServer

    s = serve(tiny_bundle, threads=1, exit_timeout=2, log_file=tmp_path / "log.txt")
    lost = []

    def ask():  # about 1000 UNet steps at the largest size: far longer than the exit timeout
        try:
            with Client(s.url) as c:
                c.generate("a red circle", steps=999, height=256, width=256)
        except StageError as err:
            lost.append(str(err))

    t = threading.Thread(target=ask)
    t.start()
    try:
        deadline = time.monotonic() + 60
        while "asdm: executing" not in (tmp_path / "log.txt").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        pid = s.process.pid
        regions = [a for p in live_in_group(pid) for a in Path(f"/proc/{p}/cmdline").read_bytes().decode().split("\0")
                   if a.startswith("triton_python_backend_shm_region_")]  # the stub's shared memory
        assert regions
        assert s.stop() != 0
        assert "ran out while a batch was running" in s.failure()
        deadline = time.monotonic() + 10  # SIGKILL takes effect asynchronously
        while live_in_group(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert live_in_group(pid) == []  # nothing of the server's process group is left running
        assert not [r for r in regions if (Path("/dev/shm") / r).exists()]  # nor its shared memory
    finally:
        s.stop(timeout=5)  # a second stop is a no-op; here for a failed assertion above
        t.join(timeout=60)
    assert lost and "closed the connection before it answered" in lost[0], lost


def test_a_start_interrupted_by_the_user_leaves_no_folder(tiny_bundle, tmp_path, monkeypatch):
    """Ctrl-C while the models load: the server goes with its temporary folders, the log too (it was kept as
    if the start had failed, in a folder no message named); a failed start keeps the log it names."""
    from asdm_export.serve.repo import write_serving_repo
    from asdm_export.serve.server import TritonServer

    def interrupt(self):
        raise KeyboardInterrupt

    write_serving_repo(tiny_bundle, tmp_path / "repo", threads=1)
    monkeypatch.setattr(TritonServer, "ready", interrupt)
    server = TritonServer(tmp_path / "repo", None)
    with pytest.raises(KeyboardInterrupt):
        server.start(timeout=60)
    assert server.process.poll() is not None and not server._work.exists()
    monkeypatch.setattr(TritonServer, "ready", lambda self: False)
    server = TritonServer(tmp_path / "repo", None)
    with pytest.raises(StageError, match="not ready after 1 s"):
        server.start(timeout=1)
    assert server.log_file.is_file() and server._work in server.log_file.parents
    shutil.rmtree(server._work)


def test_a_sigterm_between_ready_and_the_drain_handlers_still_stops_the_server(tiny_bundle, monkeypatch):
    """A SIGTERM in the moment after the server became ready and before `serve` put its drain handlers in place
    raises as during the start (exit 143); the server it started goes with it instead of being left running."""
    from asdm_export.errors import Terminated
    from asdm_export.serve import server as server_mod

    stops, started = [], []
    fake = SimpleNamespace(stop=lambda **kw: stops.append(kw), lost=None)
    monkeypatch.setattr(server_mod, "serve", lambda *a, **kw: started.append(fake) or fake)
    set_handler = signal.signal

    def signal_arrives(sig, handler):  # the command's own handlers are set as before
        if started and not stops:
            raise Terminated
        return set_handler(sig, handler)

    monkeypatch.setattr(signal, "signal", signal_arrives)
    r = CliRunner().invoke(main, ["serve", "--engines", str(tiny_bundle)])
    assert r.exit_code == 143 and "Traceback" not in r.output, r.output
    assert stops == [{"timeout": 10, "failed": False}]


def test_serve_host_names_are_addresses_and_only_the_main_thread_ties_the_server_to_itself():
    """Triton reads --http-address as an address (given localhost it bound 255.255.255.255 and never became
    ready); the parent-death signal follows the thread that forks, so it is set from the main thread only."""
    from asdm_export.serve.server import _die_with_parent, resolve_host

    assert resolve_host("localhost") == "127.0.0.1" and resolve_host("0.0.0.0") == "0.0.0.0"
    for name in ("no-such-host.invalid", "a" * 100):  # the second: a label too long to encode (UnicodeError)
        with pytest.raises(InputError, match="not a name or address of this machine"):
            resolve_host(name)
    for name in ("::1", "::"):  # was "cannot listen on ::1 (Address family ... not supported)"
        with pytest.raises(InputError, match=f"--host '{re.escape(name)}' is IPv6 only; serve listens on IPv4"):
            resolve_host(name)
    assert _die_with_parent() is not None
    seen = []
    worker = threading.Thread(target=lambda: seen.append(_die_with_parent()))
    worker.start()
    worker.join()
    assert seen == [None]


def test_a_port_is_refused_for_a_listener_not_for_a_stopped_servers_lingering_connections():
    """serve right after a server on the same port stopped: its connections linger in TIME_WAIT for a minute,
    which a plain bind counts as in use (the restart was refused); a listening socket still is refused."""
    import socket

    from asdm_export.serve.server import check_port

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with pytest.raises(InputError, match=f"port {port} on 127.0.0.1 is in use"):
            check_port(port)
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = listener.accept()
        conn.close()  # the server closes first: its side of the connection waits in TIME_WAIT
        client.close()
    check_port(port)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:  # after "pid (comm)": state, ppid
                found.append(int(stat.parent.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("when", ["idle, then SIGTERM", "running a batch"])
def test_a_model_instance_that_dies_stops_the_server_with_one_line(tiny_bundle, tmp_path, when):
    """Triton does not restart a backend stub that dies (kill -9, the out-of-memory killer): it went on sending
    it half of the requests, each answered 500, while it reported ready. serve now drains and exits 5 with a
    line naming the instance and the signal, also when the stub dies just before a SIGTERM (it said 'in-flight
    requests finished', exit 0), and leaves no process or shared memory behind. A stub killed in a batch never
    ends it, and Triton's drain waits out the whole exit timeout for it: serve stops the server once the live
    instance has nothing left to finish."""
    from asdm_export.serve.server import _stubs, free_port

    port, log = free_port(), tmp_path / "log.txt"
    proc = subprocess.Popen([sys.executable, "-m", "asdm_export.cli", "serve", "-e", str(tiny_bundle), "--port",
                             str(port), "--threads", "1", "--instances", "2", "--log", str(log)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    asked = []
    try:
        assert "serving" in proc.stdout.readline()
        [server] = children(proc.pid)
        stubs = _stubs(server)
        assert len(stubs) == 2 and all(region for _, region in stubs.values())
        with Client(f"127.0.0.1:{port}") as c:
            c.generate("a red circle", steps=1)
        if when == "running a batch":
            def ask():
                try:
                    with Client(f"127.0.0.1:{port}") as c:
                        c.generate("a red circle", steps=999, height=256, width=256)
                except (InputError, StageError) as err:
                    asked.append(err)

            threading.Thread(target=ask).start()
            deadline = time.monotonic() + 60
            while not (busy := re.findall(r"asdm: executing 1 request\(s\) on (\S+?)\b", log.read_text())[1:]):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            victim = next(pid for pid, (instance, _) in stubs.items() if instance == busy[0])
        else:
            victim = min(stubs)
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        if when == "idle, then SIGTERM":
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 5
        took = time.monotonic() - t0
        err = proc.stderr.read()
        assert f"error: serving stopped: model instance {stubs[victim][0]} (pid {victim}) was killed by signal 9 " \
               "(SIGKILL" in err and "Traceback" not in err, err
        assert took < 30, f"{took:.0f} s: the drain waited out the exit timeout (60 s)"
        assert live_in_group(server) == []
        assert not [r for _, r in stubs.values() if (Path("/dev/shm") / r).exists()]  # the dead one's too
        if when == "running a batch":
            assert asked and isinstance(asked[0], StageError), asked  # the cut-off request: the server's failure
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_server_stopped_by_someone_else_is_not_a_lost_instance(tiny_bundle):
    """SIGTERM sent to tritonserver itself (not through serve): its stubs end as it unloads, which is not an
    instance dying; the server is no longer ready then."""
    s = serve(tiny_bundle, threads=1, exit_timeout=10)
    try:
        s.process.send_signal(signal.SIGTERM)
        assert s.wait(poll=0.02) == 0 and s.lost is None
    finally:
        assert s.stop() == 0, s.failure()


def test_a_dead_stubs_shared_memory_is_freed_with_the_server(tmp_path):
    """A stub that died is a zombie with an empty command line: its region, recorded when the server became
    ready, is unlinked all the same (a server that ran out its exit timeout after a stub died left it)."""
    from asdm_export.serve.server import SHM_PREFIX, TritonServer

    region = Path("/dev/shm") / f"{SHM_PREFIX}asdm-test-{os.getpid()}"
    region.write_bytes(b"\0")
    s = TritonServer(tmp_path, None)
    s.process = subprocess.Popen(["sleep", "60"], start_new_session=True)
    s.stubs = {s.process.pid + 10**6: ("asdm_0_0", region.name)}  # no such process any more
    try:
        assert s.stop(timeout=5) is not None
        assert not region.exists() and s.process.poll() is not None
    finally:
        region.unlink(missing_ok=True)
