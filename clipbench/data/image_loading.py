"""One image from a local file, an http(s) URL or a member of a tar shard: its bytes and the decoded
RGB picture, or the reason it cannot be had.

Nothing here raises for a bad image except :class:`BadRow`, which carries a fixed reason code (the
``Reason`` constants: what a report groups by) and a human detail. Callers turn it into an error row;
a bad image never stops a job.

URLs are fetched with urllib3 under an :class:`HttpPolicy`: connect and read timeouts, a deadline for
the whole download (a server that trickles bytes), bounded retries with exponential backoff for
transient failures (timeouts, lost connections, 429 and 5xx), a byte cap checked against
``Content-Length`` and again while streaming, and redirects followed by hand so that their number is
bounded and none leaves http(s).
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import torch
import urllib3
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

HTTP_SCHEMES = ("http", "https")
JPEG_START = b"\xff\xd8\xff"
SMALL_JPEG = 256 * 256  # pixels: JPEGs up to this size are decoded a batch at a time (see decode_all)
REDIRECTS = (301, 302, 303, 307, 308)


class Reason:
    """Why a row was not scored: the codes of the ``reason`` column of an errors file."""

    MALFORMED_ROW = "malformed_row"  # a CSV line with the wrong number of fields
    EMPTY_CAPTION = "empty_caption"  # empty, blank or missing (null) caption
    CAPTION_NOT_STRING = "caption_not_string"
    MISSING_IMAGE = "missing_image"  # the row names no image (empty cell, no image member in a tar sample)
    MISSING_FILE = "missing_file"
    ZERO_BYTE = "zero_byte"
    UNREADABLE = "unreadable"  # not an image PIL can decode, or a file that cannot be read
    TRUNCATED = "truncated"
    TOO_LARGE = "too_large"  # more pixels than PIL's decompression-bomb limit
    BAD_SCHEME = "bad_scheme"  # a URL (or a redirect) to something other than http/https
    URL_TIMEOUT = "url_timeout"
    CONNECTION_ERROR = "connection_error"
    HTTP_STATUS = "http_status"  # an answer other than 200
    TOO_MANY_REDIRECTS = "too_many_redirects"
    OVER_BYTE_CAP = "over_byte_cap"


class BadRow(Exception):
    """A row that cannot be used: ``reason`` is a :class:`Reason` code, ``detail`` says more."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class _Transient(BadRow):
    """A failure worth another try (timeouts, lost connections, 429, 5xx)."""


@dataclass(frozen=True)
class TarMember:
    """An image stored in an (uncompressed) tar shard: where its bytes are."""

    path: str
    offset: int
    size: int


@dataclass(frozen=True)
class HttpPolicy:
    """How URLs are fetched. ``concurrency`` downloads run at once per data-loading worker."""

    connect_timeout: float = 5.0
    read_timeout: float = 10.0  # longest wait for the next bytes
    total_timeout: float = 30.0  # deadline of one attempt, however the bytes trickle in
    retries: int = 2  # further attempts after a transient failure
    backoff: float = 0.5  # seconds before the first retry, doubling each time
    max_bytes: int = 16 * 2**20
    max_redirects: int = 3
    concurrency: int = 16
    user_agent: str = "clipbench (image-text scoring)"


class HttpFetcher:
    """Fetches URLs under a policy. Thread-safe; its connection pool is made in the process that
    uses it (DataLoader workers are forked, and a pool must not be shared across processes)."""

    def __init__(self, policy: HttpPolicy) -> None:
        self.policy = policy
        self._pool: urllib3.PoolManager | None = None
        self._pool_pid = -1
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # spawned processes (ddp_spawn, spawn-started workers) make their own pool
        return {"policy": self.policy}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["policy"])

    def _connections(self) -> urllib3.PoolManager:
        with self._lock:
            if self._pool is None or self._pool_pid != os.getpid():
                self._pool = urllib3.PoolManager(
                    num_pools=64, maxsize=self.policy.concurrency, headers={"User-Agent": self.policy.user_agent}
                )
                self._pool_pid = os.getpid()
            return self._pool

    def fetch(self, url: str) -> bytes:
        """The body of a 200 answer to ``url``, or :class:`BadRow` after the retries allowed."""
        _check_scheme(url, Reason.BAD_SCHEME, "URL")
        attempt = 0
        while True:
            try:
                return self._follow(url)
            except _Transient as failure:
                if attempt == self.policy.retries:
                    raise BadRow(failure.reason, f"{failure.detail} (after {attempt + 1} attempts)") from None
                time.sleep(self.policy.backoff * 2**attempt)
                attempt += 1

    def _follow(self, url: str) -> bytes:
        """One attempt: follow at most ``max_redirects`` redirects, each to http(s) only."""
        for _ in range(self.policy.max_redirects + 1):
            response = self._request(url)
            try:
                if response.status in REDIRECTS and "Location" in response.headers:
                    target = urljoin(url, response.headers["Location"])
                    _check_scheme(target, Reason.BAD_SCHEME, f"redirect from {url} to")
                    url = target
                    continue
                if response.status != 200:
                    failure = _Transient if response.status == 429 or response.status >= 500 else BadRow
                    raise failure(Reason.HTTP_STATUS, f"HTTP {response.status} from {url}")
                return self._body(response, url)
            finally:
                response.release_conn()
        raise BadRow(Reason.TOO_MANY_REDIRECTS, f"more than {self.policy.max_redirects} redirects, last to {url}")

    def _request(self, url: str) -> urllib3.BaseHTTPResponse:
        timeout = urllib3.Timeout(connect=self.policy.connect_timeout, read=self.policy.read_timeout)
        try:
            return self._connections().request("GET", url, preload_content=False, redirect=False, retries=False, timeout=timeout)
        except urllib3.exceptions.NewConnectionError as err:  # refused, unreachable (a ConnectTimeoutError subclass)
            raise _Transient(Reason.CONNECTION_ERROR, f"{url}: {err}") from None
        except urllib3.exceptions.TimeoutError as err:
            raise _Transient(Reason.URL_TIMEOUT, f"{url}: {type(err).__name__}") from None
        except urllib3.exceptions.HTTPError as err:
            raise _Transient(Reason.CONNECTION_ERROR, f"{url}: {err}") from None

    def _body(self, response: urllib3.BaseHTTPResponse, url: str) -> bytes:
        cap = self.policy.max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise BadRow(Reason.OVER_BYTE_CAP, f"{url}: Content-Length {declared} > {cap} bytes")
        deadline = time.monotonic() + self.policy.total_timeout
        body = bytearray()
        try:
            # read1: whatever has arrived (at most 64 KiB), so the deadline is checked while bytes trickle in
            while chunk := response.read1(1 << 16):
                body += chunk
                if len(body) > cap:
                    raise BadRow(Reason.OVER_BYTE_CAP, f"{url}: more than {cap} bytes")
                if time.monotonic() > deadline:
                    raise _Transient(Reason.URL_TIMEOUT, f"{url}: not complete within {self.policy.total_timeout} s")
        except urllib3.exceptions.TimeoutError:
            raise _Transient(Reason.URL_TIMEOUT, f"{url}: read timed out") from None
        except urllib3.exceptions.HTTPError as err:
            raise _Transient(Reason.CONNECTION_ERROR, f"{url}: {err}") from None
        return bytes(body)


def _check_scheme(url: str, reason: str, what: str) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in HTTP_SCHEMES:
        raise BadRow(reason, f"{what} {url}: scheme {scheme or '(none)'!r} is not http/https")


def is_url(reference: str) -> bool:
    """``scheme://...``: anything with a scheme is a URL (and only http/https ones are fetched)."""
    return "://" in reference


class ImageLoader:
    """Bytes and decoded pictures of image references: a local path (relative ones under ``root``),
    a URL, or a :class:`TarMember`."""

    def __init__(self, root: str | Path | None = None, http: HttpPolicy | None = None) -> None:
        self.root = Path(root).expanduser() if root else None
        self.fetcher = HttpFetcher(http or HttpPolicy())

    def read(self, reference: str | TarMember | None) -> bytes:
        if reference is None or (isinstance(reference, str) and not reference.strip()):
            raise BadRow(Reason.MISSING_IMAGE, "the row names no image")
        if isinstance(reference, TarMember):
            data = _read_at(reference.path, reference.offset, reference.size)
        elif is_url(reference):
            data = self.fetcher.fetch(reference)
        else:
            data = self._read_file(reference)
        if not data:
            raise BadRow(Reason.ZERO_BYTE, f"{reference}: zero bytes")
        return data

    def _read_file(self, reference: str) -> bytes:
        path = Path(reference).expanduser()
        if self.root is not None and not path.is_absolute():
            path = self.root / path
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise BadRow(Reason.MISSING_FILE, f"{path}: no such file") from None
        except OSError as err:  # a directory, no permission, an I/O error
            raise BadRow(Reason.UNREADABLE, f"{path}: {err.strerror or err}") from None

    def load(self, reference: str | TarMember | None) -> Image.Image:
        return decode(self.read(reference), reference)

    def load_pixels(self, reference: str | TarMember | None) -> Tensor:
        return decode_pixels(self.read(reference), reference)


def _read_at(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` (positional read: safe from several threads)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def decode(data: bytes, reference: object = "image") -> Image.Image:
    """Bytes -> a fully decoded RGB picture, or :class:`BadRow` (unreadable, truncated, too large)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")  # decodes every pixel: truncation shows up here
    except Image.DecompressionBombError as err:
        raise BadRow(Reason.TOO_LARGE, f"{reference}: {err}") from None
    except UnidentifiedImageError:
        raise BadRow(Reason.UNREADABLE, f"{reference}: not an image PIL can identify") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = Reason.TRUNCATED if "truncated" in str(err).lower() else Reason.UNREADABLE
        raise BadRow(reason, f"{reference}: {err}") from None


def decode_pixels(data: bytes, reference: object = "image") -> Tensor:
    """Bytes -> fully decoded RGB pixels, uint8 (3, H, W), or :class:`BadRow` for the reasons of :func:`decode`.

    JPEGs are decoded by torchvision's libjpeg-turbo: the same pixels as PIL's (both run libjpeg's
    default integer IDCT and upsampling), at a third of its CPU time for small images, since PIL's
    per-image overhead dominates there. Other formats, JPEGs over PIL's decompression-bomb limit and
    JPEGs libjpeg rejects go through :func:`decode`, so a bad image gets PIL's reason (truncated,
    unreadable, too large) whichever path met it."""
    if _libjpeg_pixels(data) is not None:
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:  # corrupt or truncated: PIL below says which
            pass
    return torch.from_numpy(np.array(decode(data, reference))).permute(2, 0, 1)


def decode_all(images: Sequence[tuple[bytes, object]]) -> Iterator[Tensor | BadRow]:
    """(bytes, reference) pairs -> each one's pixels as :func:`decode_pixels` gives them, or its
    :class:`BadRow`, in order. JPEGs of at most :data:`SMALL_JPEG` pixels go to libjpeg in one call,
    which saves a third of the per-image cost of small files (if one bad file fails that call, each is
    decoded on its own); the others are decoded one at a time as they are consumed, so that a batch of
    large photos is never held decoded all at once."""
    small = [i for i, (data, _) in enumerate(images) if (_libjpeg_pixels(data) or SMALL_JPEG + 1) <= SMALL_JPEG]
    try:
        buffers = [torch.frombuffer(bytearray(images[i][0]), dtype=torch.uint8) for i in small]
        decoded = dict(zip(small, decode_jpeg(buffers, mode=ImageReadMode.RGB))) if small else {}
    except RuntimeError:
        decoded = {}
    for i, (data, reference) in enumerate(images):
        if i in decoded:
            yield decoded.pop(i)
            continue
        try:
            yield decode_pixels(data, reference)
        except BadRow as bad:
            yield bad


def _libjpeg_pixels(data: bytes) -> int | None:
    """The pixels of a JPEG that libjpeg may decode (its header gives a size within PIL's
    decompression-bomb limit), else None (PIL judges the rest)."""
    pixels = jpeg_pixels(data) if data.startswith(JPEG_START) else None
    return pixels if pixels is not None and pixels <= (Image.MAX_IMAGE_PIXELS or pixels) else None


def jpeg_pixels(data: bytes) -> int | None:
    """Width x height read from a JPEG's start-of-frame header (the segments before it are skipped by
    their lengths), or None where the header cannot be found."""
    at = 2
    while at + 9 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            return int.from_bytes(data[at + 5 : at + 7], "big") * int.from_bytes(data[at + 7 : at + 9], "big")
        else:
            at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return None
