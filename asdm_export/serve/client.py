"""A client of the ``asdm`` model through tritonclient: HTTP/REST (``HOST:PORT``, ``http://HOST:PORT``) or gRPC
(``grpc://HOST:PORT``). Over gRPC the request carries its deadline, which the server sees: a request whose
client gave up is stopped at its loop's next step. Triton's HTTP front end reports no closed connection."""

from __future__ import annotations

import math
from http.client import HTTPException

import numpy as np

from ..errors import Busy, InputError, StageError, first_line, utf8
from .repo import LOOP_INPUTS, LOOP_MODEL, QUEUE_TIMEOUT_MAX_US


def _tritonclient(protocol: str = "http"):
    """tritonclient's module for ``protocol`` (``http`` or ``grpc``) and its exception type."""
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        from tritonclient.utils import InferenceServerException
    except ImportError:
        from ..errors import MissingBackendError
        from .server import INSTALL_HINT

        raise MissingBackendError(f"the client needs tritonclient; install it with {INSTALL_HINT}") from None
    return module, InferenceServerException


def request_inputs(prompt: str, negative_prompt: str = "", steps: int | None = None, guidance_scale: float = 7.5,
                   seed: int = 0, height: int | None = None, width: int | None = None,
                   protocol: str = "http") -> list:
    """One request row of the ``asdm`` model's inputs (unset steps / size: the served model's own), for
    tritonclient's ``http`` or ``grpc`` client."""
    module, _ = _tritonclient(protocol)
    from tritonclient.utils import triton_to_np_dtype

    values = {"prompt": utf8(prompt), "negative_prompt": utf8(negative_prompt), "steps": steps,
              "guidance_scale": guidance_scale, "seed": seed, "height": height, "width": width}
    inputs = []
    for name, kind in LOOP_INPUTS.items():
        if values[name] is None:
            continue
        dtype = np.dtype(triton_to_np_dtype(kind))
        if dtype.kind == "i" and not np.iinfo(dtype).min <= values[name] <= np.iinfo(dtype).max:
            # numpy would wrap it around (a height of 2**32 + 64 sent as 64) or raise, depending on its version
            raise InputError(f"{name} {values[name]} does not fit the model's {kind} input")
        value = np.array([[values[name]]], dtype=dtype)
        tensor = module.InferInput(name, list(value.shape), kind)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def check_address(url: str) -> tuple[str, str]:
    """``(protocol, host:port)`` from ``url`` (``http://`` optional, ``grpc://`` for gRPC); anything else is one
    line before a client is made."""
    from urllib.parse import urlsplit

    protocol, address = ("grpc", url.removeprefix("grpc://")) if url.startswith("grpc://") else \
        ("http", url.removeprefix("http://"))
    try:
        parts = urlsplit(f"http://{address}")
        ok = "://" not in address and bool(parts.hostname) and parts.path in ("", "/") and parts.port is not None \
            and "@" not in parts.netloc  # no user: the server has no accounts
    except ValueError:
        ok = False
    if not ok:
        raise InputError(f"'{url}' is not a server address; give HOST:PORT (HTTP), e.g. localhost:8000, or "
                         "grpc://HOST:PORT, e.g. grpc://localhost:8001")
    return protocol, address.rstrip("/")


# gRPC's UNAVAILABLE: where no connection was made (refused, a name that does not resolve), and where the server
# went away during the call
GRPC_UNREACHED = ("failed to connect", "resolv", "resolution", "domain name")
GRPC_CLOSED = ("Socket closed", "Stream removed", "Connection reset")
GRPC_DEADLINE_MAX = 10**8  # seconds: longer is no deadline (gRPC refuses a deadline it cannot represent)


class Client:
    """``Client(url).generate(prompt, ...)``: one HxWx3 uint8 image from the server at ``url`` (``host:port`` or
    ``http://host:port`` for HTTP, ``grpc://host:port`` for gRPC). ``timeout``: seconds for the image; over
    gRPC it is the request's deadline, and the server stops work on it when it passes."""

    def __init__(self, url: str, timeout: float = 600.0):
        self.protocol, self.url = check_address(url)
        module, self._error = _tritonclient(self.protocol)
        self.timeout = timeout
        try:
            if self.protocol == "grpc":
                self.client = module.InferenceServerClient(self.url)
            else:
                self.client = module.InferenceServerClient(self.url, connection_timeout=timeout,
                                                           network_timeout=timeout)
        except Exception as err:  # noqa: BLE001 - a malformed URL: one line
            raise InputError(f"cannot use '{url}' as a server address ({err})") from None

    def generate(self, prompt: str, **kwargs) -> np.ndarray:
        inputs = request_inputs(prompt, protocol=self.protocol, **kwargs)
        # the server drops the request from its queue once the client has given up (Triton's HTTP front end does
        # not see it leave): as long as the client waits, no less (a server's batcher may hold a request for its
        # --delay-ms), and no more than the server's own limit
        timing = {"timeout": min(QUEUE_TIMEOUT_MAX_US, math.ceil(self.timeout * 1e6))
                  if math.isfinite(self.timeout) else QUEUE_TIMEOUT_MAX_US}
        if self.protocol == "grpc" and self.timeout <= GRPC_DEADLINE_MAX:  # gRPC's deadline cancels it running too
            timing["client_timeout"] = self.timeout
        try:
            result = self.client.infer(LOOP_MODEL, inputs, **timing)
        except self._error as err:
            raise self._failure(str(err.status() or ""), first_line(err.message() or err)) from None
        except HTTPException as err:  # geventhttpclient's HTTPConnectionClosed is one
            if type(err).__name__ == "HTTPParseError":  # an answer, but not HTTP/1.1: gRPC's HTTP/2, as a rule
                raise InputError(f"{self.url} does not answer in HTTP/1.1 (HTTPParseError): is it the gRPC port? "
                                 f"Give serve's HTTP port (gRPC's - 1), or grpc://{self.url}") from None
            raise self._closed(type(err).__name__) from None
        except TimeoutError:
            raise self._timed_out() from None
        except (ConnectionError, OSError) as err:
            raise InputError(f"no Triton server answers at {self.url} ({err}); start one with `asdm-export serve`") \
                from None
        return result.as_numpy("image")[0]

    def _failure(self, status: str, message: str) -> Exception:
        """The error for a failed request: HTTP status codes, or gRPC's (``StatusCode.NAME``)."""
        status = status.removeprefix("StatusCode.")
        if status in ("400", "INVALID_ARGUMENT"):
            return InputError(f"the server refused the request: {message}")
        if status in ("404", "405", "501", "UNIMPLEMENTED"):  # a server, but not Triton's inference protocol
            port = "gRPC port (default 8001)" if self.protocol == "grpc" else "HTTP port (default 8000)"
            return InputError(f"{self.url} does not serve Triton's inference protocol ({status}: {message}); give "
                              f"the {port} of `asdm-export serve`")
        if status == "DEADLINE_EXCEEDED":
            return self._timed_out()
        if status in ("503", "UNAVAILABLE") and "Exceeds maximum queue size" in message:  # Triton's words
            return Busy(f"the server at {self.url} is busy: its queue is full (serve --max-queue); try again later")
        if status in ("503", "UNAVAILABLE") and "Request timeout expired" in message:
            return Busy(f"the server at {self.url} is busy: the request waited in its queue past its timeout "
                        "(--timeout, or the server's --queue-timeout); try again later")
        if status == "UNAVAILABLE" and any(m in message.lower() for m in GRPC_UNREACHED):
            return InputError(f"no Triton gRPC server answers at {self.url} ({message}); give the gRPC port of "
                              "`asdm-export serve` (its HTTP port + 1), or start one")
        if status == "UNAVAILABLE" and any(m in message for m in GRPC_CLOSED):
            return self._closed(message)
        return StageError(f"the server failed the request ({status or 'no status'}): {message}")

    def _timed_out(self) -> InputError:
        return InputError(f"the server at {self.url} sent no image within {self.timeout:g} s; raise --timeout (a "
                          "first request may wait for the server's warm-up)")

    def _closed(self, detail: str) -> StageError:
        return StageError(f"the server at {self.url} closed the connection before it answered (it stopped or "
                          f"failed: its log says why; {detail})")

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
