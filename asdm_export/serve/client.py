"""A client of the ``asdm`` model (Triton's HTTP/REST protocol, through tritonclient)."""

from __future__ import annotations

from http.client import HTTPException

import numpy as np

from ..errors import InputError, StageError, first_line, utf8
from .repo import LOOP_INPUTS, LOOP_MODEL


def _http(protocol: str = "http"):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as http
        else:
            import tritonclient.http as http
        from tritonclient.utils import InferenceServerException
    except ImportError:
        from ..errors import MissingBackendError
        from .server import INSTALL_HINT

        raise MissingBackendError(f"the client needs tritonclient; install it with {INSTALL_HINT}") from None
    return http, InferenceServerException


def request_inputs(prompt: str, negative_prompt: str = "", steps: int | None = None, guidance_scale: float = 7.5,
                   seed: int = 0, height: int | None = None, width: int | None = None,
                   protocol: str = "http") -> list:
    """One request row of the ``asdm`` model's inputs (unset steps / size: the served model's own), for
    tritonclient's ``http`` or ``grpc`` client."""
    http, _ = _http(protocol)
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
        tensor = http.InferInput(name, list(value.shape), kind)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def check_address(url: str) -> str:
    """``host:port`` from ``url`` (``http://`` optional); anything else is one line before a client is made."""
    from urllib.parse import urlsplit

    address = url.removeprefix("http://")
    try:
        parts = urlsplit(f"http://{address}")
        ok = "://" not in address and bool(parts.hostname) and parts.path in ("", "/") and parts.port is not None
    except ValueError:
        ok = False
    if not ok:
        raise InputError(f"'{url}' is not a server address; give HOST:PORT, e.g. localhost:8000")
    return address.rstrip("/")


class Client:
    """``Client(url).generate(prompt, ...)``: one HxWx3 uint8 image from the server at ``url`` (host:port)."""

    def __init__(self, url: str, timeout: float = 600.0):
        http, self._error = _http()
        self.url = check_address(url)
        self.timeout = timeout
        try:
            self.client = http.InferenceServerClient(self.url, connection_timeout=timeout, network_timeout=timeout)
        except Exception as err:  # noqa: BLE001 - a malformed URL: one line
            raise InputError(f"cannot use '{url}' as a server address ({err})") from None

    def generate(self, prompt: str, **kwargs) -> np.ndarray:
        try:
            result = self.client.infer(LOOP_MODEL, request_inputs(prompt, **kwargs))
        except self._error as err:
            status = str(err.status() or "")
            message = first_line(err.message() or err)
            if status == "400":
                raise InputError(f"the server refused the request: {message}") from None
            if status in ("404", "405", "501"):  # a web server, but not Triton's inference protocol
                raise InputError(f"{self.url} does not serve Triton's inference protocol (HTTP {status}: {message}); "
                                 "give the HTTP port of `asdm-export serve` (default 8000)") from None
            raise StageError(f"the server failed the request ({status or 'no status'}): {message}") from None
        except HTTPException as err:  # geventhttpclient's HTTPConnectionClosed is one
            raise StageError(f"the server at {self.url} closed the connection before it answered (it stopped or "
                             f"failed: its log says why; {type(err).__name__})") from None
        except TimeoutError:
            raise InputError(f"the server at {self.url} sent no image within {self.timeout:g} s; raise --timeout "
                             "(a first request may wait for the server's warm-up)") from None
        except (ConnectionError, OSError) as err:
            raise InputError(f"no Triton server answers at {self.url} ({err}); start one with `asdm-export serve`") \
                from None
        return result.as_numpy("image")[0]

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
