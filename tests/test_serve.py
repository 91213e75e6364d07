"""`mmsearch serve`: every route and every error, through Starlette's test client and a live uvicorn."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'mmsearch[serve]'")
pytest.importorskip("httpx", reason="Starlette's test client needs httpx")

from starlette.testclient import TestClient  # noqa: E402

import retrieval  # noqa: E402
from retrieval import server  # noqa: E402
from conftest import REPO, run_mmsearch, solid_image, start_server, stop_server  # noqa: E402

DEMO = REPO / "index_data" / "demo"
LOCAL = "http://127.0.0.1:8765"


@pytest.fixture
def collection(gallery_index: Path) -> Iterator[retrieval.Collection]:
    with retrieval.open_index(gallery_index, create=False) as idx:
        yield idx


@pytest.fixture
def client(collection: retrieval.Collection) -> TestClient:
    return TestClient(server.create_app(collection), base_url=LOCAL)


def _png(size: tuple[int, int] = (40, 40), color: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    out = BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def _id_of(collection: retrieval.Collection, name: str) -> int:
    hits = [r for r in collection.search("a red circle", k=500, target="images") if Path(r.path).name == name]
    return hits[0].id


# --- search routes ---------------------------------------------------------------------------


def test_text_search_returns_the_cli_json_fields_with_ids(client: TestClient, collection) -> None:
    response = client.get("/api/search", params={"q": "a red circle", "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert len(body) == 5
    assert Path(body[0]["path"]).name.startswith("red_circle_")
    expected = [r.to_dict() for r in collection.search("a red circle", k=5)]
    assert [{**r, "score": pytest.approx(r["score"], abs=1e-5)} for r in body] == expected
    # Plus where the hybrid ranking placed each (the demo's file names hold the query's words).
    assert all({"rank", "score", "relevance", "kind", "path", "id", "ranks"} <= set(r)
               <= {"rank", "score", "relevance", "kind", "path", "id", "ranks", "words_score", "fused"} for r in body)


def test_search_parameters_target_min_score_and_under(client: TestClient, gallery_index: Path) -> None:
    texts = client.get("/api/search", params={"q": "a red circle", "target": "texts", "k": 3}).json()
    assert [r["kind"] for r in texts] == ["text"] * 3 and texts[0]["text"] == "a red circle"
    assert texts[0]["line"] == 1
    high = client.get("/api/search", params={"q": "a red circle", "k": 50, "min_score": 0.9}).json()
    assert high and all(r["score"] >= 0.9 for r in high) and len(high) < 50
    folder = str(gallery_index.parent / "demo")
    assert client.get("/api/search", params={"q": "a red circle", "under": folder}).json()
    assert client.get("/api/search", params={"q": "a red circle", "under": "/nowhere"}).json() == []


@pytest.mark.parametrize("query, reason", [
    ({"q": ""}, "query text"), ({}, "query text"), ({"q": "x", "k": "0"}, "k must"), ({"q": "x", "k": "abc"}, "k must"),
    ({"q": "x", "k": "100000"}, "k must"), ({"q": "x", "target": "videos"}, "unknown target"),
    ({"q": "x", "min_score": "high"}, "min_score"), ({"q": "x", "min_score": "nan"}, "min_score"),
])
def test_bad_search_parameters_are_400_with_a_reason(client: TestClient, query: dict, reason: str) -> None:
    response = client.get("/api/search", params=query)
    assert response.status_code == 400
    assert reason in response.json()["error"]


def test_image_upload_finds_its_caption(client: TestClient) -> None:
    data = (DEMO / "blue_star_01.webp").read_bytes()
    response = client.post("/api/search/image", files={"image": ("q.webp", data, "image/webp")}, data={"k": "3"})
    assert response.status_code == 200
    body = response.json()
    assert len(body) == 3 and body[0]["kind"] == "text" and "blue star" in body[0]["text"]
    images = client.post("/api/search/image?target=images&k=2", files={"image": ("q.webp", data)}).json()
    assert Path(images[0]["path"]).name == "blue_star_01.webp"


def test_upload_errors(collection: retrieval.Collection) -> None:
    app = server.create_app(collection, max_upload=50_000, max_pixels=250_000)
    client = TestClient(app, base_url=LOCAL)
    too_big = client.post("/api/search/image", files={"image": ("big.bin", os.urandom(60_000))})
    assert too_big.status_code == 413 and "limit" in too_big.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while the body streams in
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(10):
            yield os.urandom(10_000)

    streamed = client.post("/api/search/image", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413
    pixels = client.post("/api/search/image", files={"image": ("wide.png", _png((600, 500)))})
    assert pixels.status_code == 413 and "MP limit" in pixels.json()["error"]
    text = client.post("/api/search/image", files={"image": ("notes.png", b"just some text, not pixels")})
    assert text.status_code == 415
    truncated = client.post("/api/search/image", files={"image": ("cut.png", _png((200, 200))[:300])})
    assert truncated.status_code == 415
    assert client.post("/api/search/image", content=_png(), headers={"content-type": "image/png"}).status_code == 400
    assert client.post("/api/search/image", files={"other": ("x.png", _png())}).status_code == 400


def test_uploads_are_never_written_near_the_index(client: TestClient, gallery_index: Path) -> None:
    before = {p for p in gallery_index.parent.rglob("*") if "thumbs" not in p.parts and "query-cache" not in p.parts}
    big = BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)).save(big, "PNG")
    assert len(big.getvalue()) > 1_100_000  # over the 1 MB multipart spool threshold
    assert client.post("/api/search/image", files={"image": ("noise.png", big.getvalue())}).status_code == 200
    after = {p for p in gallery_index.parent.rglob("*") if "thumbs" not in p.parts and "query-cache" not in p.parts}
    assert after == before


def test_similar_uses_the_stored_vector_and_leaves_the_item_out(client: TestClient, collection, monkeypatch) -> None:
    item = _id_of(collection, "red_circle_01.jpg")

    def no_model(*_a, **_k):  # "more like this" must not re-embed anything
        raise AssertionError("the model was called")

    monkeypatch.setattr(collection, "embed_images", no_model)
    monkeypatch.setattr(collection, "embed_query_text", no_model)
    body = client.get(f"/api/similar/{item}", params={"k": 4}).json()
    assert [r["rank"] for r in body] == [1, 2, 3, 4]
    assert item not in [r["id"] for r in body]
    assert Path(body[0]["path"]).name == "red_circle_02.jpg"
    texts = client.get(f"/api/similar/{item}", params={"target": "texts", "k": 1}).json()
    assert texts[0]["text"] == "a red circle"
    line = texts[0]["id"]
    assert client.get(f"/api/similar/{line}", params={"k": 2}).json()[0]["kind"] == "text"
    assert client.get("/api/similar/999999").status_code == 404
    assert client.get("/api/similar/x1").status_code == 400


def test_info_is_what_mmsearch_info_json_prints(client: TestClient, gallery_index: Path) -> None:
    cli = run_mmsearch("info", "--json", "--index", gallery_index)
    assert cli.returncode == 0, cli.stderr
    assert client.get("/api/info").json() == json.loads(cli.stdout)


# --- thumbnails and files --------------------------------------------------------------------


def test_thumbnail_is_an_upright_jpeg_cached_by_file_hash(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    img = Image.new("RGB", (600, 300), (0, 0, 255))
    img.paste((255, 255, 0), (0, 0, 300, 300))  # left half yellow
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate 90° clockwise
    img.save(photos / "sideways.jpg", exif=exif)
    with retrieval.open_index(tmp_path / "idx", model="shapes-mini") as idx:
        idx.add([photos])
        client = TestClient(server.create_app(idx), base_url=LOCAL)
        item = idx.search("a blue square", k=1)[0].id
        start = time.perf_counter()
        first = client.get(f"/thumb/{item}")
        assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
        thumb = Image.open(BytesIO(first.content))
        assert thumb.format == "JPEG" and thumb.size == (128, 256)  # rotated upright, long side 256
        assert thumb.getpixel((64, 30))[2] < 100 and thumb.getpixel((64, 220))[2] > 150  # yellow on top
        cached = list((tmp_path / "idx" / "thumbs").glob(f"{item}-*.jpg"))
        assert len(cached) == 1 and cached[0].read_bytes() == first.content
        assert client.get(f"/thumb/{item}").content == first.content
        assert time.perf_counter() - start < 10

        Image.new("RGB", (100, 300), (255, 0, 0)).save(photos / "sideways.jpg")  # a changed file
        idx.add()
        item = idx.search("a red square", k=1)[0].id
        assert Image.open(BytesIO(client.get(f"/thumb/{item}").content)).size == (85, 256)
        assert not cached[0].exists()  # the old content's thumbnail went with the re-scan
        assert len(list((tmp_path / "idx" / "thumbs").glob("*.jpg"))) == 1


def test_read_only_index_caches_thumbnails_per_user(gallery_index: Path, tmp_path: Path, model_cache: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can write a read-only directory")
    copy = tmp_path / "ro-index"
    shutil.copytree(gallery_index, copy)
    shutil.rmtree(copy / "thumbs", ignore_errors=True)
    copy.chmod(0o555)
    try:
        with retrieval.open_index(copy, create=False) as idx:
            client = TestClient(server.create_app(idx), base_url=LOCAL)
            item = _id_of(idx, "red_circle_01.jpg")
            assert client.get(f"/thumb/{item}").status_code == 200
        assert not (copy / "thumbs").exists()
        assert list((model_cache / "thumbs").rglob(f"{item}-*.jpg"))
    finally:
        copy.chmod(0o755)


def test_thumbnail_cache_falls_back_to_the_user_cache_when_the_index_is_read_only(collection, monkeypatch,
                                                                                 model_cache: Path) -> None:
    from retrieval import gallery

    real_access = os.access
    monkeypatch.setattr(gallery.os, "access", lambda p, mode: False if Path(p) == collection.directory
                        else real_access(p, mode))
    thumbs = gallery.Thumbnails(collection)
    assert thumbs.directory.is_relative_to(model_cache / "thumbs")
    item = _id_of(collection, "red_circle_02.jpg")
    data = thumbs.get(item)
    assert list(thumbs.directory.glob(f"{item}-*.jpg"))[0].read_bytes() == data


def test_file_serves_the_original_bytes_with_its_type(client: TestClient, collection) -> None:
    for name, media in [("red_circle_01.jpg", "image/jpeg"), ("blue_star_01.webp", "image/webp"),
                        ("green_circle_01.png", "image/png")]:
        response = client.get(f"/file/{_id_of(collection, name)}")
        assert response.status_code == 200
        assert response.headers["content-type"] == media
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content == (DEMO / name).read_bytes()


def test_a_file_changed_or_swapped_since_indexing_is_not_served(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    solid_image(photos / "a.png", (255, 0, 0), (60, 60))
    secret = tmp_path / "secret.png"
    solid_image(secret, (0, 0, 255), (60, 60))
    link = photos / "b.png"
    solid_image(tmp_path / "real-b.png", (0, 255, 0), (60, 60))
    link.symlink_to(tmp_path / "real-b.png")
    with retrieval.open_index(tmp_path / "idx", model="shapes-mini") as idx:
        idx.add([photos])
        client = TestClient(server.create_app(idx), base_url=LOCAL)
        by_name = {Path(r.path).name: r.id for r in idx.search("a square", k=5)}
        assert client.get(f"/file/{by_name['b.png']}").status_code == 200
        link.unlink()
        link.symlink_to(secret)  # same size (same generator), other content and mtime
        swapped = client.get(f"/file/{by_name['b.png']}")
        assert swapped.status_code == 404 and "changed" in swapped.json()["error"]
        assert swapped.content != secret.read_bytes()
        solid_image(photos / "a.png", (255, 255, 0), (60, 60))
        os.utime(photos / "a.png", (1, 1))
        assert client.get(f"/file/{by_name['a.png']}").status_code == 404
        assert client.get(f"/thumb/{by_name['a.png']}").status_code == 404  # not cached yet, file changed
        (photos / "a.png").unlink()
        gone = client.get(f"/file/{by_name['a.png']}")
        assert gone.status_code == 404 and "error" in gone.json()


def test_texts_have_no_thumbnail_or_file(client: TestClient, collection) -> None:
    line = collection.search("a red circle", k=1, target="texts")[0].id
    for route in ("thumb", "file"):
        response = client.get(f"/{route}/{line}")
        assert response.status_code == 404
        assert "is a text" in response.json()["error"]


@pytest.mark.parametrize("path, status", [
    ("/file/..%2F..%2Fetc%2Fpasswd", 404), ("/file/...", 400), ("/file/abc", 400), ("/thumb/-1", 400), ("/file/1e3", 400),
    ("/file/" + "9" * 30, 404), ("/thumb/" + "9" * 30, 404), ("/file/99999999", 404), ("/file/%EF%BC%91", 400),
    ("/nowhere", 404), ("/file/1/extra", 404),
])
def test_ids_only_numbers_no_paths(client: TestClient, path: str, status: int) -> None:
    response = client.get(path)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert "root:" not in response.text


def test_wrong_method_is_a_json_405(client: TestClient) -> None:
    response = client.post("/api/search?q=x")
    assert response.status_code == 405 and response.json()["status"] == 405


# --- safety: token, Host header, binding -----------------------------------------------------


def test_token_guards_everything_but_the_page_shell(collection) -> None:
    client = TestClient(server.create_app(collection, token="s3cret"), base_url=LOCAL)
    item = _id_of(collection, "red_circle_01.jpg")
    guarded = ["/api/search?q=a+red+circle", f"/api/similar/{item}", "/api/info", f"/thumb/{item}",
               f"/file/{item}", "/openapi.json"]
    for path in guarded:
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
    assert client.post("/api/search/image", files={"image": ("x.png", _png())}).status_code == 401
    for path in ("/", "/app.js", "/style.css"):
        assert client.get(path).status_code == 200
    assert client.get("/api/info").headers["www-authenticate"] == "Bearer"

    assert client.post("/login", data={"token": "nope"}).status_code == 401
    assert "mmsearch_token" not in client.cookies
    login = client.post("/login", data={"token": "s3cret"})
    assert login.status_code == 200
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/info").status_code == 200  # the cookie now carries it


def test_foreign_host_headers_are_refused(collection) -> None:
    client = TestClient(server.create_app(collection), base_url=LOCAL)
    for host in ("evil.example", "evil.example:8765", "127.0.0.1.evil.example", ""):
        response = client.get("/api/info", headers={"host": host})
        assert response.status_code == 400, host
        assert "Host" in response.json()["error"]
    assert client.get("/", headers={"host": "rebind.example:8765"}).status_code == 400
    for host in ("127.0.0.1:8765", "localhost:8765", "LOCALHOST", "[::1]:8765"):
        assert client.get("/api/info", headers={"host": host}).status_code == 200, host
    named = TestClient(server.create_app(collection, allow_hosts=["photos.lan"]), base_url=LOCAL)
    assert named.get("/api/info", headers={"host": "photos.lan:8765"}).status_code == 200
    wildcard = TestClient(server.create_app(collection, host="0.0.0.0", token="t"), base_url=LOCAL)
    assert wildcard.get("/api/info", headers={"host": "192.168.1.5:8765", "authorization": "Bearer t"}).status_code == 200


def test_non_loopback_bind_needs_a_token(gallery_index: Path) -> None:
    with pytest.raises(server.CannotListen, match="--token"):
        server.check_bind("0.0.0.0", None, False)
    assert server.check_bind("127.0.0.1", None, False) is None
    assert server.check_bind("::1", None, False) is None
    assert server.check_bind("0.0.0.0", "t", False) is None
    assert "without a token" in server.check_bind("192.168.1.5", None, True)
    refused = run_mmsearch("serve", "--index", gallery_index, "--host", "0.0.0.0")
    assert refused.returncode == 1
    assert "--token" in refused.stderr and "Traceback" not in refused.stderr


def test_openapi_describes_every_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    api_routes = {route.path for route in client.app.routes
                  if route.path.startswith(("/api", "/thumb", "/file", "/openapi"))}
    assert set(spec["paths"]) == api_routes


def test_page_shell_is_served_with_a_strict_policy(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text)  # nothing from elsewhere
    script = client.get("/app.js").text
    assert "innerHTML" not in script and "http://" not in script and "https://" not in script


# --- one process, many threads; a re-index in another process ----------------------------------


def test_lazy_loads_happen_once_under_concurrent_requests(gallery_index: Path, monkeypatch) -> None:
    from retrieval import encoder, vectors

    calls = {"export": 0, "vectors": 0}
    real_export, real_load = encoder.load_export, vectors.VectorIndex.load.__func__

    def slow_export(*args, **kwargs):
        calls["export"] += 1
        time.sleep(0.2)  # widen the window in which a second thread would load it again
        return real_export(*args, **kwargs)

    def slow_load(cls, *args, **kwargs):
        calls["vectors"] += 1
        time.sleep(0.2)
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(encoder, "load_export", slow_export)
    monkeypatch.setattr(vectors.VectorIndex, "load", classmethod(slow_load))
    with retrieval.open_index(gallery_index, create=False) as idx:
        client = TestClient(server.create_app(idx), base_url=LOCAL)
        words = ["red", "blue", "green", "yellow", "white", "black", "purple", "orange"]
        answers: dict[str, list] = {}

        stamp = time.time_ns()  # texts no earlier run left in the query cache

        def ask(color: str) -> None:
            answers[color] = client.get("/api/search", params={"q": f"{color} {stamp}", "k": 3}).json()

        threads = [threading.Thread(target=ask, args=(w,)) for w in words]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert calls == {"export": 1, "vectors": 1}
        for w in words:  # the same answers as one at a time
            assert [r["id"] for r in answers[w]] == [r.id for r in idx.search(f"{w} {stamp}", k=3)]


def test_reindex_while_serving_answers_from_the_new_generation(tmp_path: Path, model_cache: Path) -> None:
    photos = tmp_path / "photos"
    shutil.copytree(DEMO, photos, ignore=shutil.ignore_patterns("*circle*", "*.txt"))
    with retrieval.open_index(tmp_path / "idx", model="shapes-mini") as idx:
        idx.add([photos])
    with retrieval.open_index(tmp_path / "idx", create=False) as idx:
        client = TestClient(server.create_app(idx), base_url=LOCAL)
        before = client.get("/api/search", params={"q": "a red circle", "k": 1}).json()
        assert "circle" not in before[0]["path"]
        held = idx.vectors("image")
        errors: list[str] = []
        stop = threading.Event()

        def keep_asking() -> None:  # queries in flight while the other process writes
            while not stop.is_set():
                response = client.get("/api/search", params={"q": "a green star", "k": 3})
                if response.status_code != 200 or len(response.json()) != 3:
                    errors.append(f"{response.status_code} {response.text[:200]}")

        worker = threading.Thread(target=keep_asking)
        worker.start()
        try:
            for name in ("red_circle_01.jpg", "red_circle_02.jpg"):
                shutil.copy(DEMO / name, photos / name)
            done = run_mmsearch("index", "--index", tmp_path / "idx", "-q", env={"MMSEARCH_CACHE": str(model_cache)})
            assert done.returncode == 0, done.stderr
        finally:
            stop.set()
            worker.join()
        assert not errors, errors[:3]
        after = client.get("/api/search", params={"q": "a red circle", "k": 2}).json()
        assert sorted(Path(r["path"]).name for r in after) == ["red_circle_01.jpg", "red_circle_02.jpg"]
        assert idx.vectors("image") is not held and len(held) == len(idx.vectors("image")) - 2
        assert idx.vectors("image")._mmapped  # the saved file, mapped, not a copy in memory
        assert held.search(np.ones(held.dim, np.float32) / np.sqrt(held.dim), 1)[1][0][0] >= 0  # still usable
        assert client.get("/api/info").json()["images"] == len(idx.vectors("image"))


# --- a live server ----------------------------------------------------------------------------


def test_live_uvicorn_server(gallery_index: Path, model_cache: Path) -> None:
    import httpx

    proc, url = start_server(gallery_index, "--token", "live-token", env={"MMSEARCH_CACHE": str(model_cache)})
    try:
        auth = {"Authorization": "Bearer live-token"}
        hits = httpx.get(f"{url}/api/search", params={"q": "a red circle", "k": 3}, headers=auth, timeout=30).json()
        assert Path(hits[0]["path"]).name.startswith("red_circle_")
        assert httpx.get(f"{url}/api/search", params={"q": "x"}, timeout=30).status_code == 401
        assert httpx.get(f"{url}/api/info", headers={**auth, "Host": "attacker.example"}, timeout=30).status_code == 400
        thumb = httpx.get(f"{url}/thumb/{hits[0]['id']}", headers=auth, timeout=30)
        assert Image.open(BytesIO(thumb.content)).format == "JPEG"
        port = int(url.rsplit(":", 1)[1])
        for raw in ("/file/../../etc/passwd", "/thumb/..%2f..%2fetc%2fpasswd", "/../../../etc/passwd"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # unnormalized path
                sock.sendall(f"GET {raw} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer live-token\r\n"
                             "Connection: close\r\n\r\n".encode())
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
            status = int(reply.split(b" ", 2)[1])
            assert status in (400, 404), (raw, reply[:200])
            assert b"root:" not in reply
    finally:
        stop_server(proc)


def test_query_html_writes_a_self_contained_escaped_page(gallery_index: Path, tmp_path: Path, model_cache: Path) -> None:
    out = tmp_path / "results.html"
    # By meaning alone: the red square with the tag-like name is among its top 5 (file names would
    # bring the other red shapes in).
    done = run_mmsearch("query", "a red circle", "--index", gallery_index, "-k", "5", "--html", out,
                        "--semantic-only", env={"MMSEARCH_CACHE": str(model_cache)})
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert page.count('<img src="data:image/jpeg;base64,') == 5
    assert "&lt;img src=x onerror=alert(1)&gt;.png" in page  # EVIL_NAME, the red square named like a tag
    assert "<img src=x" not in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "red_circle_01.jpg" in page
