"""`mmsearch serve`: a JSON API and a web gallery over one open index (Starlette, run by uvicorn).

Starlette rather than FastAPI: the API is eight routes, and FastAPI would add pydantic (and its
import time) for validation these few parameters do not need; the OpenAPI description is written
out below instead of generated. Imported only by `serve`: `import retrieval` never loads it.

One process answers every request: the model, the vector caches and the database handle are the
`Collection`'s, whose lazy loads are locked; blocking work runs in Starlette's thread pool. Each API
request first takes up vector files a concurrent `mmsearch index` saved (`Collection.refresh`).
"""

from __future__ import annotations

import functools
import hmac
import io
import ipaddress
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .compose import item_vectors
from .errors import BadQuery, EmptyIndex, MMSearchError, ModelMismatch
from .gallery import FileChanged, ItemNotFound, Thumbnails, image_file, item_row
from .search import MODES, SORTS, TARGETS, by_date

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from .collection import Collection
    from .search import Result

log = logging.getLogger("mmsearch")

DEFAULT_PORT = 8765
DEFAULT_MAX_UPLOAD = 20 * 1024 * 1024
#: Pixel limit of an uploaded query image (indexing allows more: its files are the user's own).
MAX_UPLOAD_PIXELS = 50_000_000
MAX_K = 1000
COOKIE = "mmsearch_token"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
#: Reachable without a token: the page shell and the login form.
PUBLIC_PATHS = frozenset({"/", "/app.js", "/style.css", "/login"})
#: The largest id SQLite can hold; a bigger one is simply unknown.
MAX_ID = 2**63 - 1

_STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
           "/app.js": ("app.js", "text/javascript; charset=utf-8"),
           "/style.css": ("style.css", "text/css; charset=utf-8")}
_PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
             "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
_IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
                ".gif": "image/gif", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff"}


class CannotListen(MMSearchError):
    """The server cannot bind its address, or binding it would be unsafe."""


class UploadTooLarge(MMSearchError):
    """An uploaded query image is over the size or pixel limit."""


class NotAnImage(MMSearchError):
    """An upload that is not a readable image."""


_STATUS: list[tuple[type[MMSearchError], int]] = [
    (BadQuery, 400), (ModelMismatch, 400), (ItemNotFound, 404), (FileChanged, 404), (EmptyIndex, 404),
    (UploadTooLarge, 413), (NotAnImage, 415),
]


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address) only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, no_auth: bool) -> str | None:
    """Refuse a non-loopback address without a token (CannotListen); a warning to print for --no-auth."""
    if is_loopback(host):
        return None
    if token:
        return None
    if not no_auth:
        raise CannotListen(f"binding {host} exposes the index to the network: give --token SECRET "
                           "(or --no-auth to serve it to anyone who can reach this port)")
    return f"serving {host} without a token: anyone who can reach this port can search the index and read its images"


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (CannotListen with the reason)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def prepare(collection: Collection) -> None:
    """Load the vector caches and both model towers before the first request instead of during it.

    Besides speed, this creates each ONNX session once, before requests run in parallel (the
    backend creates sessions lazily without a lock).
    """
    if collection.manifest is not None:
        from PIL import Image

        collection.load_vectors()
        collection.embed_texts(["a photo"])
        collection.embed_images([Image.new("RGB", (64, 64), (128, 128, 128))])


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _host_name(header: str) -> str:
    """The name in a Host header, without port or brackets, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0].rstrip(".") if header.count(":") == 1 else header.rstrip(".")


class Guard:
    """ASGI middleware: refuse foreign Host headers (DNS rebinding), then require the token."""

    def __init__(self, app: ASGIApp, hosts: frozenset[str] | None, token: str | None) -> None:
        self.app = app
        self.hosts = hosts  # None: any Host (a wildcard bind guarded by a token)
        self.token = token

    def authorized(self, headers: Headers, cookies: dict[str, str]) -> bool:
        """Whether the request carries the token (Bearer header or the login cookie)."""
        if not self.token:
            return True
        auth = headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else cookies.get(COOKIE, "")
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        if self.hosts is not None and _host_name(request.headers.get("host", "")) not in self.hosts:
            response = _error(400, "Host header not allowed: use the server's own address")
        elif scope["path"] not in PUBLIC_PATHS and not self.authorized(request.headers, request.cookies):
            response = _error(401, "a token is needed: log in on the page, or send 'Authorization: Bearer TOKEN'",
                              {"WWW-Authenticate": "Bearer"})
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


# --- parameters -------------------------------------------------------------------------------


def _item_id(request: Request) -> int:
    raw = request.path_params["id"]
    if not raw.isdecimal() or not raw.isascii():
        raise BadQuery(f"item id must be a number, not {raw[:40]!r}")
    value = int(raw)
    if value > MAX_ID:
        raise ItemNotFound(f"no item {raw[:40]} in this index")
    return value


def _search_options(params: Any) -> dict[str, Any]:
    """k, target, min_score, under, model and sort from query or form parameters (BadQuery when malformed)."""
    options: dict[str, Any] = {}
    raw_k = params.get("k") or "20"
    if not raw_k.isdecimal() or not 1 <= int(raw_k) <= MAX_K:
        raise BadQuery(f"k must be a whole number from 1 to {MAX_K}")
    options["k"] = int(raw_k)
    target = params.get("target") or None
    if target is not None and target not in TARGETS:
        raise BadQuery(f"unknown target {target!r}: use images, texts or all")
    options["target"] = target
    if params.get("min_score"):
        try:
            options["min_score"] = float(params["min_score"])
        except ValueError:
            raise BadQuery("min_score must be a number") from None
        if not math.isfinite(options["min_score"]):
            raise BadQuery("min_score must be a finite number")
    options["under"] = params.get("under") or None
    options["model"] = params.get("model") or None
    options["sort"] = params.get("sort") or "score"
    if options["sort"] not in SORTS:
        raise BadQuery(f"sort must be {' or '.join(SORTS)}")
    return options


def _results(results: Sequence[Result]) -> JSONResponse:
    return JSONResponse([r.to_dict() for r in results])


# --- the app ----------------------------------------------------------------------------------


def create_app(collection: Collection, *, host: str = "127.0.0.1", token: str | None = None,
               allow_hosts: Sequence[str] = (), max_upload: int = DEFAULT_MAX_UPLOAD,
               max_pixels: int = MAX_UPLOAD_PIXELS) -> Starlette:
    """The ASGI app serving `collection`: the page, the JSON API, thumbnails and originals.

    `host` is the address bound: Host headers must name it (or a loopback name on loopback, or one
    of `allow_hosts`), except on a wildcard address with a token. With `token`, every route but
    the page shell needs it.
    """
    thumbnails = Thumbnails(collection)
    wildcard = host in ("0.0.0.0", "::", "")
    hosts = None if wildcard and token else frozenset(
        {_host_name(host), *LOOPBACK_NAMES, *(_host_name(h) for h in allow_hosts)})

    @functools.lru_cache(maxsize=4096)
    def text_vector(text: str, model: str | None) -> np.ndarray:
        # Kept in memory: the model is warm, and the on-disk query cache's write and pruning per
        # new text would cost more than the text tower of a small model.
        return collection.embed_texts([text], model=model)[0]

    def fresh() -> Collection:
        """The collection, with the vector files another process saved since taken up; FAISS on one thread.

        Requests already run in parallel, so a search split over OpenMP threads gains nothing, and on a
        busy machine their spin-waits made a 100k-item search ~15x slower (26 vs 1.6 ms, 2 cores, load 6).
        The setting is per thread, so each request's worker thread makes it.
        """
        import faiss

        faiss.omp_set_num_threads(1)
        collection.refresh()
        return collection

    def api(func: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await func(request)
            except MMSearchError as exc:
                status = next((s for cls, s in _STATUS if isinstance(exc, cls)), 503)
                return _error(status, str(exc))
        return endpoint

    async def search_text(request: Request) -> Response:
        options = _search_options(request.query_params)
        query = request.query_params.get("q", "")
        if not query.strip():
            raise BadQuery("give a query text: /api/search?q=...")
        options["target"] = options["target"] or "images"  # a text finds images unless told otherwise
        mode = request.query_params.get("mode") or "hybrid"
        if mode not in MODES:
            raise BadQuery(f"mode must be {', '.join(MODES)}")
        return _results(await run_in_threadpool(
            lambda: fresh().search(text_vector(query, options["model"]), words=query, mode=mode, **options)))

    async def search_image(request: Request) -> Response:
        image, form = await _upload(request, max_upload, max_pixels)
        options = _search_options({**request.query_params, **form})
        return _results(await run_in_threadpool(lambda: fresh().search(image, **options)))

    async def similar(request: Request) -> Response:
        item_id = _item_id(request)
        options = _search_options(request.query_params)
        return _results(await run_in_threadpool(lambda: similar_items(fresh(), item_id, **options)))

    async def info(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(lambda: fresh().info()))

    async def thumb(request: Request) -> Response:
        item_id = _item_id(request)
        data = await run_in_threadpool(thumbnails.get, item_id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

    async def original(request: Request) -> Response:
        item_id = _item_id(request)
        found = await run_in_threadpool(image_file, collection, item_id)
        media = _IMAGE_TYPES.get(_suffix(found.item.path), "application/octet-stream")
        return Response(found.data, media_type=media,
                        headers={"Content-Security-Policy": "sandbox", "Cache-Control": "private, no-cache"})

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def login(request: Request) -> Response:
        if not token:
            return JSONResponse({"ok": True})  # nothing to log in to
        form = await request.form(max_files=0, max_fields=2)
        given = str(form.get("token", ""))
        if not hmac.compare_digest(given.encode(), token.encode()):
            return _error(401, "wrong token")
        response = JSONResponse({"ok": True})
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    async def static(request: Request) -> Response:
        name, media = _STATIC[request.url.path]
        body = resources.files("retrieval").joinpath("web", name).read_bytes()
        headers = {"Content-Security-Policy": _PAGE_CSP, "Cache-Control": "no-cache"}
        return Response(body, media_type=media, headers=headers)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = {404: f"no such route: {request.url.path}", 405: "method not allowed"}.get(status, "request failed")
        return _error(status, message)

    async def failed(request: Request, exc: Exception) -> Response:
        log.error("request %s failed: %s: %s", request.url.path, type(exc).__name__, exc)
        return _error(500, "internal error (see the server's log)")

    routes = [
        Route("/api/search", api(search_text), methods=["GET"]),
        Route("/api/search/image", api(search_image), methods=["POST"]),
        Route("/api/similar/{id}", api(similar), methods=["GET"]),
        Route("/api/info", api(info), methods=["GET"]),
        Route("/thumb/{id}", api(thumb), methods=["GET"]),
        Route("/file/{id}", api(original), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        *(Route(path, static, methods=["GET"]) for path in _STATIC),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: failed})
    app.add_middleware(Guard, hosts=hosts, token=token)
    app.add_middleware(_Headers)
    return app


class _Headers:
    """ASGI middleware: `nosniff` on every response, so nothing served is reinterpreted as a page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]
            await send(message)

        await self.app(scope, receive, send_with if scope["type"] == "http" else send)


def _suffix(path: str) -> str:
    dot = path.rfind(".")
    return path[dot:].lower() if dot >= 0 else ""


async def _upload(request: Request, max_upload: int, max_pixels: int) -> tuple[Any, dict[str, str]]:
    """The uploaded query image (decoded, upright RGB) and the other form fields.

    The body is counted while it streams in and cut off past `max_upload`; multipart parts
    larger than 1 MB are spooled to the system's temporary directory, never near the index.
    """
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadQuery("send the image as multipart/form-data, in a field named 'image'")
    length = request.headers.get("content-length", "")
    if length.isdecimal() and int(length) > max_upload:
        raise UploadTooLarge(f"upload is {int(length)} bytes, over the {max_upload}-byte limit")
    seen = 0

    async def counted() -> dict[str, Any]:
        nonlocal seen
        message = await request.receive()
        seen += len(message.get("body", b""))
        if seen > max_upload:
            raise UploadTooLarge(f"upload is over the {max_upload}-byte limit")
        return message

    try:
        form = await Request(request.scope, counted).form(max_files=1, max_fields=10)
    except HTTPException as exc:  # malformed multipart
        raise BadQuery(f"cannot read the upload: {exc.detail}") from None
    try:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise BadQuery("no file in the form field 'image'")
        data = await upload.read()
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
    finally:
        await form.close()
    return await run_in_threadpool(_decode_upload, data, max_pixels), fields


def _decode_upload(data: bytes, max_pixels: int) -> Any:
    from PIL import Image, UnidentifiedImageError

    from .images import describe_error, open_image

    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise NotAnImage("the upload is not an image mmsearch can read") from None
    if width * height > max_pixels:
        raise UploadTooLarge(f"image is {width}x{height}, over the {max_pixels // 1_000_000} MP limit for queries")
    try:
        return open_image(data)
    except Exception as exc:  # noqa: BLE001 - any decoder error means an unusable query image
        raise NotAnImage(f"cannot decode the upload: {describe_error(exc)}") from None


def similar_items(collection: Collection, item_id: int, *, k: int = 20, target: str | None = None,
                  min_score: float | None = None, under: str | None = None, model: str | None = None,
                  sort: str = "score") -> list[Result]:
    """Items like an indexed one, by its stored vector (no re-embedding) under the index's model `model`
    (default: the first); the item itself left out.

    `target` defaults to the item's own kind (more images like an image, texts like a text).
    """
    item = item_row(collection, item_id)
    vector = item_vectors(collection.reader, item.kind, [item_id], collection.model_of(model)).get(item_id)
    if vector is None:
        raise BadQuery(f"item {item_id} has no vector of model {model} yet (its file changed since it was indexed?)")
    target = target or ("images" if item.kind == "image" else "texts")
    found = collection.search(vector, k=k + 1, target=target, min_score=min_score, under=under, model=model)
    found = [replace(r, rank=rank) for rank, r in enumerate((r for r in found if r.id != item_id), 1)][:k]
    return by_date(collection.reader, found) if sort == "date" else found


def _params(*names: str) -> list[dict[str, Any]]:
    described = {
        "q": ("query", {"type": "string"}, "Query text.", True),
        "k": ("query", {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 20}, "Number of results.", False),
        "target": ("query", {"type": "string", "enum": sorted(TARGETS)},
                   "What to return (default: the other modality; for /api/similar the item's own).", False),
        "min_score": ("query", {"type": "number"}, "Drop results below this cosine similarity.", False),
        "under": ("query", {"type": "string"}, "Only items whose file lies in this folder.", False),
        "model": ("query", {"type": "string"},
                  "Which of the index's models (`index --add-model`): its name or key (default: the first).", False),
        "mode": ("query", {"type": "string", "enum": list(MODES), "default": "hybrid"},
                 "hybrid: meaning and matching words (file and folder names, EXIF, OCR text) fused by reciprocal "
                 "rank fusion, 1/(60 + rank) summed, where words match; semantic or words: one ranking.", False),
        "sort": ("query", {"type": "string", "enum": list(SORTS), "default": "score"},
                 "score: the ranking; date: by capture time, oldest first, undated last.", False),
        "id": ("path", {"type": "integer", "minimum": 0}, "Item id (the `id` of a search result).", True),
    }
    return [{"name": n, "in": described[n][0], "schema": described[n][1], "description": described[n][2],
             "required": described[n][3]} for n in names]


def _responses(ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    reasons = {400: "Bad parameter", 401: "Missing or wrong token", 404: "Unknown id, nothing to show, or file changed",
               413: "Upload too large", 415: "Not an image"}
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {"200": ok, **{str(code): {"description": reasons[code], "content": error} for code in (401, *errors)}}


_RESULTS = {"description": "Ranked results", "content": {"application/json": {"schema": {
    "type": "array", "items": {"$ref": "#/components/schemas/Result"}}}}}
_JPEG = {"description": "JPEG thumbnail, long side 256 px", "content": {"image/jpeg": {}}}

#: The API as OpenAPI 3.1, served at /openapi.json (a test checks it names every route).
OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "mmsearch", "version": "1",
             "description": "Search an mmsearch index by text or image. With a token, send "
                            "'Authorization: Bearer TOKEN' (or the cookie the page's login sets)."},
    "paths": {
        "/api/search": {"get": {"summary": "Text query",
                                "parameters": _params("q", "k", "target", "min_score", "under", "model", "mode", "sort"),
                                "responses": _responses(_RESULTS, 400, 404)}},
        "/api/search/image": {"post": {
            "summary": "Image query (multipart upload, field 'image'; other parameters as query or form fields)",
            "parameters": _params("k", "target", "min_score", "under", "model", "sort"),
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "properties": {"image": {"type": "string", "format": "binary"}},
                "required": ["image"]}}}},
            "responses": _responses(_RESULTS, 400, 413, 415)}},
        "/api/similar/{id}": {"get": {"summary": "More like an indexed item (its stored vector)",
                                      "parameters": _params("id", "k", "target", "min_score", "under", "model",
                                                            "sort"),
                                      "responses": _responses(_RESULTS, 400, 404)}},
        "/api/info": {"get": {"summary": "What `mmsearch info --json` prints",
                              "responses": _responses({"description": "Index information",
                                                       "content": {"application/json": {}}})}},
        "/thumb/{id}": {"get": {"summary": "Thumbnail of an image item", "parameters": _params("id"),
                                "responses": _responses(_JPEG, 400, 404)}},
        "/file/{id}": {"get": {"summary": "The original image, while it still matches the index",
                               "parameters": _params("id"),
                               "responses": _responses({"description": "The file", "content": {"image/*": {}}},
                                                       400, 404)}},
        "/openapi.json": {"get": {"summary": "This description", "responses": _responses(
            {"description": "OpenAPI 3.1", "content": {"application/json": {}}})}},
    },
    "components": {"schemas": {
        "Result": {"type": "object", "required": ["rank", "score", "kind", "path", "id"], "properties": {
            "rank": {"type": "integer"}, "score": {"type": "number", "description": "cosine similarity"},
            "kind": {"type": "string", "enum": ["image", "text"]}, "path": {"type": "string"},
            "id": {"type": "integer"}, "text": {"type": "string"}, "line": {"type": "integer"},
            "relevance": {"type": "number"},
            "ranks": {"type": "object", "description": "rank in each ranking run (semantic, words); null: not in it"},
            "words_score": {"type": "number"}, "fused": {"type": "number"},
            "taken": {"type": "string", "description": "capture time (sort=date)"}}},
        "Error": {"type": "object", "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}},
    }},
}

