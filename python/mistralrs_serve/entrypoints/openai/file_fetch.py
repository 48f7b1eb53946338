"""Fetching a request's `file_url`, without letting a caller reach what the server can.

Only http(s); every address the host resolves to must be public (unless the
server allows private ones), and the connection goes to the address that was
checked, so a second DNS answer cannot swap in an internal one. Redirects are
followed by hand, each one checked again. The body is read up to the file
size limit and no further. Blocking: async callers run it on a worker thread.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from email.message import Message
from urllib.parse import unquote, urljoin

import httpx

from mistralrs_serve.errors import InvalidRequestError, PayloadTooLargeError
from mistralrs_serve.store.files import safe_filename

MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
TOTAL_TIMEOUT_S = 120.0  # a server that drips bytes never trips the read timeout
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PRIVATE_HINT = "see --allow-private-file-urls"


@dataclass(frozen=True)
class FetchedFile:
    content: bytes
    filename: str
    content_type: str | None
    url: str  # after redirects


def fetch_file(
    url: str,
    *,
    max_bytes: int,
    allow_private: bool,
    param: str,
    transport: httpx.BaseTransport | None = None,
) -> FetchedFile:
    """GET `url` as the limits allow; InvalidRequestError (400) or
    PayloadTooLargeError (413) naming `param` when it cannot or may not."""
    deadline = time.monotonic() + TOTAL_TIMEOUT_S
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    # trust_env off: a proxy from the environment would connect somewhere other than the checked address
    with httpx.Client(
        timeout=timeout, follow_redirects=False, trust_env=False, transport=transport
    ) as client:
        for _ in range(MAX_REDIRECTS + 1):
            request = pinned_request(client, url, allow_private, param)
            try:
                response = client.send(request, stream=True)
                try:
                    if response.is_redirect and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code >= 400:
                        raise InvalidRequestError(
                            f"fetching {url} failed: HTTP {response.status_code}", param
                        )
                    content = _read_capped(response, max_bytes, deadline, url, param)
                finally:
                    response.close()
            except httpx.TimeoutException:
                raise InvalidRequestError(f"fetching {url} timed out", param) from None
            except httpx.HTTPError as e:
                raise InvalidRequestError(f"fetching {url} failed: {type(e).__name__}: {e}", param) from None
            return FetchedFile(content, _filename(response, url), response.headers.get("content-type"), url)
    raise InvalidRequestError(f"fetching the file_url took more than {MAX_REDIRECTS} redirects", param)


def pinned_request(
    client: httpx.Client | httpx.AsyncClient,
    url: str,
    allow_private: bool,
    param: str,
    *,
    what: str = "file_url",
    private_hint: str = PRIVATE_HINT,
) -> httpx.Request:
    """A GET of `url` addressed to one checked IP, with the original Host header and TLS name.
    `what` names the URL in messages; `private_hint` says how private addresses would be allowed.
    Resolves the host (blocking): async callers run it on a worker thread."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise InvalidRequestError(f"{what} is not a valid URL: {e}", param) from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidRequestError(f"{what} must be an http or https URL; got scheme {parsed.scheme!r}", param)
    host = parsed.host
    if not host:
        raise InvalidRequestError(f"{what} has no host", param)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    address = checked_address(host, port, allow_private, param, what=what, private_hint=private_hint)
    return client.build_request(
        "GET",
        parsed.copy_with(host=str(address)),
        headers={"Host": parsed.netloc.decode("ascii"), "Accept-Encoding": "identity"},
        extensions={"sni_hostname": host} if parsed.scheme == "https" else None,
    )


def checked_address(
    host: str,
    port: int,
    allow_private: bool,
    param: str,
    *,
    what: str = "file_url",
    private_hint: str = PRIVATE_HINT,
) -> IPAddress:
    """The first address of `host`, after checking that every one of them may be fetched."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise InvalidRequestError(f"{what}: cannot resolve {host!r}: {e}", param) from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise InvalidRequestError(f"{what}: {host!r} has no address", param)
    if not allow_private:
        for address in addresses:
            if is_refused_address(address):
                raise InvalidRequestError(
                    f"{what}: {host!r} resolves to {address}, a loopback, private, link-local or "
                    f"multicast address; the server refuses those ({private_hint})",
                    param,
                )
    return addresses[0]


def is_refused_address(address: IPAddress) -> bool:
    """Anything but a public unicast address: loopback, private, link-local, multicast, reserved."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def _read_capped(response: httpx.Response, max_bytes: int, deadline: float, url: str, param: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(url, max_bytes, param)
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(url, max_bytes, param)
        if time.monotonic() > deadline:
            raise InvalidRequestError(f"fetching {url} took more than {TOTAL_TIMEOUT_S:.0f} s", param)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(url: str, max_bytes: int, param: str) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"the file at {url} is over the server's file limit of {max_bytes} bytes", param
    )


def _filename(response: httpx.Response, url: str) -> str:
    disposition = response.headers.get("content-disposition")
    if disposition:
        message = Message()
        message["content-disposition"] = disposition
        name = message.get_filename()
        if name:
            return safe_filename(name, "download")
    return safe_filename(unquote(httpx.URL(url).path), "download")
