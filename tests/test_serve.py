"""Serving: the text-to-image model on a real Triton Inference Server (the nvidia-pytriton wheel's), started on
free localhost ports with the tiny bundle; the deployment repository's files and its BLS loop."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from unittest import mock

import numpy as np
import pytest
from click.testing import CliRunner

from asdm_export.check.accuracy import image_psnr
from asdm_export.cli import main
from asdm_export.errors import InputError
from asdm_export.runtime.pipeline import AsdmPipeline, ImageRequest
from asdm_export.serve.model import parse_rows, serve_requests

pytriton = pytest.importorskip("pytriton", reason="serving needs the [serve] extra (nvidia-pytriton)")
http = pytest.importorskip("tritonclient.http")

from asdm_export.serve import serve  # noqa: E402
from asdm_export.serve.client import Client, request_inputs  # noqa: E402
from asdm_export.serve.repo import read_config, write_triton_repo  # noqa: E402

STEPS = 4
DELAY_US = 500_000  # requests sent together fill one batch before the delay ends (a full batch leaves at once)


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
    s = serve(tiny_bundle, threads=1, delay_us=DELAY_US, exit_timeout=20,
              log_file=tmp_path_factory.mktemp("triton") / "server.log")
    yield s
    assert s.stop() == 0, s.failure()


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return AsdmPipeline.from_bundle(tiny_bundle)


def test_batched_requests_get_the_image_run_gives(server, pipe):
    """Two requests sent together are one denoising loop (one execution in the metrics); each gets the image
    of `run` with its own prompt, seed and guidance."""
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


def test_a_client_that_disconnects_leaves_no_stuck_work(server):
    """gRPC: the client's deadline cancels the request and the loop stops at its next step. HTTP (no
    cancellation in Triton's HTTP frontend): the loop runs out, and nothing stays pending."""
    import tritonclient.grpc as grpc
    from tritonclient.utils import InferenceServerException

    client = grpc.InferenceServerClient(f"{server.host}:{server.ports.grpc}")
    with pytest.raises(InferenceServerException, match="Deadline"):
        client.infer("asdm", request_inputs("a red circle", steps=900, protocol="grpc"), client_timeout=1.5)
    client.close()
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


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_bundle, tmp_path):
    from asdm_export.serve.server import free_port

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "asdm_export.cli", "serve", "-e", str(tiny_bundle), "--port",
                             str(port), "--threads", "1", "--log", str(tmp_path / "log.txt")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
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
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=120)
        assert result.get("image") is not None and result["image"].shape == (128, 128, 3)
        assert proc.wait(timeout=120) == 0, proc.stdout.read()
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_killed_serve_leaves_no_server_behind(tiny_bundle, tmp_path):
    from asdm_export.serve.server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "asdm_export.cli", "serve", "-e", str(tiny_bundle), "--port",
                             str(port), "--threads", "1", "--log", str(tmp_path / "log.txt")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
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
    assert out[3].startswith("steps must be from 1 to 1000") and out[4].startswith("cancelled")
    assert out[5].startswith("the rows of one request must share height and width")  # not one failed batch
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
    record = write_triton_repo(engines, tmp_path / "py", platform="python")
    assert {"unet_0", "unet_1", "text_encoder", "vae_decoder"} <= set(record["models"])
    static = read_config(tmp_path / "py" / "unet_0" / "config.pbtxt")
    assert [list(i.dims) for i in static.input] == [[2, 4, 16, 16], [2], [2, 77, 32]]
    scratch = tmp_path / "scratch"  # the server's temporary folders land here, and go when it stops
    scratch.mkdir()
    with mock.patch.object(tempfile, "tempdir", str(scratch)), \
            TritonServer(tmp_path / "py", Ports.free(), log_file=tmp_path / "log.txt") as s, Client(s.url) as c:
        image = c.generate("a red circle", steps=STEPS, seed=3)
        counts = {m: metric(s.metrics(), "nv_inference_exec_count", m) for m in ("unet_0", "unet_1")}
    assert not list(scratch.iterdir())
    (expected,) = pipe("a red circle", steps=STEPS, seed=3)
    assert image_psnr(image, expected) >= 40
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
    (["serve", "--backend", "trt"], 2, "holds no TensorRT engines"),  # said before a server starts
    (["triton-repo", "--platform", "tensorrt_plan", "--out", "{tmp}/repo"], 2, "holds no TensorRT engines"),
    (["client", "--url", "127.0.0.1:{port}", "-p", "x", "--out", "{tmp}/x.png"], 2, "no Triton server answers"),
    (["client", "--url", "ftp://127.0.0.1:{port}", "-p", "x", "--out", "{tmp}/x.png"], 2, "is not a server address"),
    (["client", "--url", "http://::bad", "-p", "x", "--out", "{tmp}/x.png"], 2, "is not a server address"),
    (["triton-repo", "--gpus", "0,0", "--out", "{tmp}/repo"], 2, "distinct GPU ids"),
    (["serve", "--delay-ms", "nan"], 2, "is not a finite number"),
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
    for log, needle in ((tmp_path / "missing" / "x.log", "does not exist"), (tmp_path, "cannot write Triton's log")):
        r = CliRunner().invoke(main, ["serve", "--engines", str(tiny_bundle), "--log", str(log)])
        assert r.exit_code == 2 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not list(scratch.iterdir()), list(scratch.iterdir())


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
