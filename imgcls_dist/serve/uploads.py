"""HTTP request bodies -> the encoded images they carry, bounded in size before they are read whole.

Two shapes, as `curl --data-binary @x.jpg` and `curl -F file=@x.jpg` send them: a raw body with an image/*
(or application/octet-stream) content type is one image; multipart/form-data carries one image per `file`
field, in order. Multipart is parsed by Starlette's parser (python-multipart), on a body already bounded here.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, NamedTuple

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

FILE_FIELD = "file"
RAW_TYPES = ("image/", "application/octet-stream")
# How much of a refused body is read and dropped before the 413 goes out (see _drain)
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_TIMEOUT_S = 10.0


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class Upload(NamedTuple):
    name: str | None  # the multipart filename; None for a raw body
    data: bytes


def _too_large(size: int | str, limit: int) -> RequestError:
    return RequestError(413, f"request body of {size} bytes is over the limit of {limit} bytes")


async def _drain(stream: AsyncIterator[bytes]) -> None:
    """Read and drop what is left of a refused body, up to DRAIN_MAX_BYTES / DRAIN_TIMEOUT_S.

    A server that answers 413 and closes while the client is still sending leaves unread bytes in its socket,
    so the close goes out as a reset and most clients (urllib, requests) report "connection reset" instead of
    reading the 413. Reading the rest first is nginx's "lingering close"; the bounds keep an endless upload
    from holding the replica."""

    async def drop() -> None:
        dropped = 0
        async for chunk in stream:
            dropped += len(chunk)
            if dropped > DRAIN_MAX_BYTES:
                return

    try:
        await asyncio.wait_for(drop(), DRAIN_TIMEOUT_S)
    except (asyncio.TimeoutError, ClientDisconnect):
        pass


async def read_bounded(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit`: from Content-Length before
    any byte is kept, else (chunked uploads) when the running count passes it. Nothing past the limit is kept."""
    stream = request.stream()
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(stream)
        raise _too_large(declared, limit)
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await _drain(stream)
            raise _too_large(f"more than {limit}", limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _multipart(request: Request, body: bytes, max_files: int) -> list[Upload]:
    parser = MultiPartParser(request.headers, _once(body), max_files=max_files)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise RequestError(400, f"bad multipart body: {exc.message}") from None
    files = [v for k, v in form.multi_items() if k == FILE_FIELD]
    if not files:
        raise RequestError(400, f"multipart body has no '{FILE_FIELD}' field")
    if not all(isinstance(f, UploadFile) for f in files):
        raise RequestError(400, f"multipart '{FILE_FIELD}' fields must be files (curl -F {FILE_FIELD}=@image.jpg)")
    return [Upload(f.filename, await f.read()) for f in files]


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_multipart(request: Request) -> bool:
    return _content_type(request) == "multipart/form-data"


async def read_uploads(request: Request, max_body_bytes: int, max_files: int) -> list[Upload]:
    """-> the images of one request, in order; RequestError(status, one-line reason) for what is not one."""
    ctype = _content_type(request)
    if is_multipart(request):
        return await _multipart(request, await read_bounded(request, max_body_bytes), max_files)
    if ctype and not ctype.startswith(RAW_TYPES):
        raise RequestError(415, f"content type {ctype!r} is not an image; send image bytes (image/*) "
                                f"or multipart/form-data with '{FILE_FIELD}' fields")
    return [Upload(None, await read_bounded(request, max_body_bytes))]
