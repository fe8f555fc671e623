"""``serve``, ``triton-repo`` and ``client``: text-to-image behind NVIDIA Triton Inference Server."""

from __future__ import annotations

import math
from pathlib import Path

import click

from .. import signals
from ..errors import StageError
from ..limits import EXIT_TIMEOUT_MAX, INSTANCES_MAX
from .options import GUIDANCE, SEED, Finite, overwrite_option, runtime_options, scheduler_option


def delay_option(default_ms: float):
    """--delay-ms; the defaults are ``serve.repo``'s (SERVE_DELAY_US, DEPLOY_DELAY_US: tests/test_cli_defaults.py)."""
    return click.option("--delay-ms", type=Finite(0, 60_000), default=default_ms, show_default=True,
                        help="How long the batcher holds a request for more to fill a batch.")


def queue_options(command):
    """--max-queue, --queue-timeout: the ``asdm`` model's queue, so that a loaded server refuses at once what it
    cannot take soon (the client exits 75: try again later) instead of letting requests wait without end."""
    command = click.option(
        "--queue-timeout", type=Finite(0, 86_400), default=0, show_default=True, metavar="SECONDS",
        help="Refuse a request that waited this long in the queue (0: a day). A request may ask for less: "
             "the project's client sends its --timeout.")(command)
    return click.option(
        "--max-queue", type=click.IntRange(0, 1_000_000), default=0, show_default=True,
        help="Requests that may wait for an instance; more are refused at once (0: no limit).")(command)


@click.command("serve")
@click.option("--engines", "-e", "folder", type=click.Path(path_type=Path), required=True,
              help="An engine folder (`build`) or a bundle (`export`) with text encoder and VAE graphs.")
@runtime_options
@scheduler_option
@click.option("--instances", type=click.IntRange(1, INSTANCES_MAX), default=1, show_default=True,
              help="Model instances (each runs its own pipeline; on GPUs, per GPU).")
@click.option("--max-batch", type=click.IntRange(1, None), default=None,
              help="Requests one denoising loop takes (dynamic batching; 1 turns it off). Default: what the UNet "
                   "graphs' batch profile allows (half its max: guidance doubles the batch).")
@delay_option(20.0)
@queue_options
@click.option("--port", type=click.IntRange(1, 65533), default=8000, show_default=True,
              help="HTTP port; gRPC takes port+1, Prometheus metrics port+2.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="IPv4 address or name to listen on (0.0.0.0: all).")
@click.option("--exit-timeout", type=click.IntRange(10, EXIT_TIMEOUT_MAX), default=60, show_default=True,
              help="On SIGTERM / Ctrl-C: seconds to finish in-flight requests and unload the models before "
                   "exiting (unloading alone takes seconds, hence at least 10).")
@click.option("--log", "log_file", type=click.Path(path_type=Path), default=None,
              help="Triton's log file. Default: a temporary file, named if the server fails.")
@click.pass_obj
def serve(obj, folder, backend, provider, device, dtype, scheduler, instances, max_batch, delay_ms, max_queue,
          queue_timeout, port, host, threads, exit_timeout, log_file):
    """Serve text-to-image on NVIDIA Triton Inference Server (HTTP/REST and gRPC, KServe v2 protocol).

    The model `asdm` takes prompt and optionally negative_prompt, steps, guidance_scale, seed, height, width
    (one row per image) and returns image (uint8, H x W x 3). Requests that share steps, size and guidance
    on/off are batched into one denoising loop; each keeps its seed, so it gets the image it would get alone.
    Health: /v2/health/ready and /v2/health/live; metrics: http://HOST:PORT+2/metrics. SIGTERM, Ctrl-C or a
    closed terminal (SIGHUP) stops taking requests, finishes the ones in flight and exits 0. A model instance
    that dies (killed, out of memory) stops the server the same way, then exits 5: Triton would not restart it.
    --max-queue and --queue-timeout refuse what a loaded server cannot take soon (client: busy, exit 75).

    \b
    Examples:
      asdm-export serve --engines bundles/toy --port 8000
      asdm-export client --url localhost:8000 --prompt "a red circle" --out circle.png
    """
    from ..console import console, stdout
    from ..serve.server import serve as start

    with console.status(f"starting Triton Inference Server on {folder} ..."):
        server = start(folder, port=port, host=host, backend=backend, provider=provider,
                       device=device, dtype=dtype, scheduler=scheduler, instances=instances, max_batch=max_batch,
                       delay_us=round(delay_ms * 1000), threads=threads, exit_timeout=exit_timeout, log_file=log_file,
                       max_queue=max_queue, queue_timeout_us=math.ceil(queue_timeout * 1e6))
    try:  # a signal before the drain handlers are in place still stops the server (start's own ones raise)
        # Triton drains on SIGTERM; a second signal is not forwarded. A closed terminal (SIGHUP) drains too, so
        # that the temporary folders go. One the command was started to ignore stays ignored (SIGHUP under
        # nohup, SIGINT in a script's background job), as for every command.
        signals.take(lambda signum, frame: server.drain())
    except BaseException:
        server.stop(timeout=10, failed=False)
        raise
    stdout.print(f"serving {folder} as model 'asdm': http://{server.url} (gRPC {server.host}:{server.ports.grpc}, "
                 f"metrics http://{server.host}:{server.ports.metrics}/metrics); SIGTERM or Ctrl-C to stop")
    server.wait()  # also drains the server when a model instance dies (server.lost)
    code = server.stop()  # the exit code, and the temporary repository and backend folder go
    if server.lost:
        raise StageError(f"serving stopped: {server.failure()}")
    if code != 0:
        raise StageError(f"Triton Inference Server exited with code {code}: {server.failure()}")
    stdout.print("stopped: in-flight requests finished")


@click.command("triton-repo")
@click.option("--engines", "-e", "folder", type=click.Path(path_type=Path), required=True,
              help="An engine folder (`build`: TensorRT engines or ONNX Runtime graphs) or a bundle (`export`).")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="Model repository to write.")
@click.option("--platform", type=click.Choice(["tensorrt_plan", "onnxruntime_onnx", "python"]), default=None,
              help="How Triton runs each graph. Default: tensorrt_plan for TensorRT engines, else onnxruntime_onnx; "
                   "python runs ONNX graphs on ONNX Runtime in the Python backend (with --gpus, its CUDA provider), "
                   "for Triton builds without the ONNX Runtime backend, e.g. the nvidia-pytriton wheel's.")
@click.option("--instances", type=click.IntRange(1, INSTANCES_MAX), default=1, show_default=True,
              help="Instances of each model (per GPU with --gpus).")
@click.option("--gpus", default=None, metavar="0,1,...", help="GPUs the graph models' instances are placed on.")
@click.option("--max-batch", type=click.IntRange(1, None), default=None,
              help="Requests one denoising loop takes. Default: what the UNet graphs' profile allows.")
@delay_option(2.0)
@queue_options
@scheduler_option
@overwrite_option
def triton_repo(folder, out, platform, instances, gpus, max_batch, delay_ms, max_queue, queue_timeout, scheduler,
                overwrite):
    """Write a Triton model repository for a GPU node: one model per graph (its platform, shapes, dtypes and
    profile; instance groups per GPU) and `asdm`, the denoising loop in the Python backend, calling the
    graph models through business-logic scripting (BLS).

    \b
    Example:
      asdm-export triton-repo --engines engines/sd15-trt --out repo --gpus 0,1
      tritonserver --model-repository repo
    """
    from ..console import stdout
    from ..serve.repo import write_triton_repo

    gpu_ids = None
    if gpus is not None:  # which ids, and how many, is write_triton_repo's to check
        try:
            gpu_ids = [int(g) for g in gpus.split(",")]
        except ValueError:
            raise click.BadParameter(f"'{gpus}' is not a comma-separated list of GPU ids (0, 1, ...)",
                                     param_hint="--gpus") from None
    manifest = write_triton_repo(folder, out, platform=platform, instances=instances, gpus=gpu_ids,
                                 max_batch=max_batch, delay_us=round(delay_ms * 1000), overwrite=overwrite,
                                 max_queue=max_queue, queue_timeout_us=math.ceil(queue_timeout * 1e6),
                                 scheduler=scheduler)
    stdout.print(f"wrote {len(manifest['models'])} models ({manifest['platform']} graphs, max batch "
                 f"{manifest['max_batch']}) to {out}; run: tritonserver --model-repository {out.resolve()}")


@click.command("client")
@click.option("--url", default="localhost:8000", show_default=True,
              help="The server: HOST:PORT for HTTP, grpc://HOST:PORT for gRPC (serve's HTTP port + 1), whose "
                   "--timeout the server sees: it stops working on a request its client gave up.")
@click.option("--prompt", "-p", required=True, help="Prompt.")
@click.option("--negative-prompt", default="", help="Negative prompt.")
@click.option("--steps", type=click.IntRange(1, None), default=None,
              help="Denoising steps. Default: the served schedule's.")
@click.option("--guidance", type=GUIDANCE, default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--height", type=click.IntRange(1, None), default=None,
              help="Image height in pixels. Default: the server's.")
@click.option("--width", type=click.IntRange(1, None), default=None,
              help="Image width in pixels. Default: the server's.")
@click.option("--timeout", type=click.FloatRange(0.1, None), default=600.0, show_default=True,
              help="Seconds to wait for the image; also the longest the request waits in the server's queue "
                   "(over gRPC, the request's deadline). Exit 75: the server is busy, try again later.")
@click.option("--out", "-o", type=click.Path(path_type=Path), required=True, help="PNG path.")
def client(url, prompt, negative_prompt, steps, guidance, seed, height, width, timeout, out):
    """Ask a running `asdm-export serve` (or a Triton repository's `asdm` model) for one image."""
    from ..console import stdout
    from ..runtime.pipeline import check_png_output, save_png
    from ..serve.client import Client

    check_png_output(out)
    with Client(url, timeout=timeout) as c:
        image = c.generate(prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance, seed=seed,
                           height=height, width=width)
    save_png(image, out)
    stdout.print(f"wrote {out} ({image.shape[1]}x{image.shape[0]})")
