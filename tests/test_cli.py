"""The core contract of `mmsearch index / query / info`, driven through the CLI with a tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import retrieval
from conftest import REPO, invoke, run_mmsearch, solid_image


def index_args(index: Path, model: str, *paths: Path | str) -> list[str]:
    return ["index", *map(str, paths), "--index", str(index), "--model", model, "--pretrained", "random", "--workers", "0"]


def query_json(runner, index: Path, *args: str) -> list[dict]:
    result = invoke(runner, "query", *args, "--index", str(index), "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("argv", [["--help"], ["index", "--help"], ["query", "--help"]])
def test_help_and_import_do_not_load_torch(argv: list[str]) -> None:
    code = (
        "import sys, retrieval, cli\n"
        "from click.testing import CliRunner\n"
        f"r = CliRunner().invoke(cli.cli, {argv!r})\n"
        "assert r.exit_code == 0, r.output\n"
        "assert 'Usage' in r.output\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_query_in_a_fresh_process_loads_neither_torch_nor_sqlalchemy(runner, tmp_path, tiny_model, photos) -> None:
    """The query path's import budget: the ONNX text tower and stdlib sqlite3 only (see RESULTS.md)."""
    index = tmp_path / "idx"
    assert invoke(runner, *index_args(index, tiny_model, photos)).exit_code == 0
    code = (
        "import json, sys, cli\n"
        "from click.testing import CliRunner\n"
        f"r = CliRunner().invoke(cli.cli, ['query', 'a red square', '--index', {str(index)!r}, '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "assert len(json.loads(r.stdout)) == 6\n"
        "bad = [m for m in ('torch', 'open_clip', 'sqlalchemy', *sys.argv[1:]) if m in sys.modules]\n"
        "assert not bad, f'imported {bad}'\n"
    )
    # A cached text needs no model at all: not even the encoder module or Pillow.
    for extra in ([], ["retrieval.encoder", "PIL.Image"]):
        done = subprocess.run([sys.executable, "-c", code, *extra], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((index / "query-cache").glob("*.npy"))) == 1


def test_index_then_query_ranks_by_cosine(runner, tmp_path, tiny_model, photos) -> None:
    index = tmp_path / "idx"
    result = invoke(runner, *index_args(index, tiny_model, photos))
    assert result.exit_code == 0, result.output
    assert "added 6" in result.stderr
    hits = query_json(runner, index, "a red square", "-k", "10")
    assert len(hits) == 6
    assert [h["rank"] for h in hits] == list(range(1, 7))
    assert all(h["kind"] == "image" and os.path.isabs(h["path"]) for h in hits)
    assert {Path(h["path"]).name for h in hits} == {f"img{i}.{e}" for i, e in enumerate(["jpg", "png", "webp", "JPG", "bmp", "gif"])}
    # Scores are the cosine similarities of the library's own embeddings, best first.
    with retrieval.open_index(index, create=False) as idx:
        q = idx.embed_texts(["a red square"])[0]
        expected = {h["path"]: float(idx.embed_images([h["path"]])[0] @ q) for h in hits}
    for h in hits:
        assert h["score"] == pytest.approx(expected[h["path"]], abs=1e-4)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    # -k and --min-score cut the list.
    assert len(query_json(runner, index, "a red square", "-k", "2")) == 2
    cut = hits[2]["score"]
    assert all(h["score"] >= cut for h in query_json(runner, index, "a red square", "--min-score", str(cut)))
    # The readable table has one line per hit on stdout.
    table = invoke(runner, "query", "a red square", "--index", str(index), "-k", "3")
    assert len(table.stdout.strip().splitlines()) == 3


def test_index_location_from_env(runner, tmp_path, tiny_model, photos, monkeypatch) -> None:
    monkeypatch.setenv("MMSEARCH_INDEX", str(tmp_path / "from-env"))
    result = invoke(runner, "index", str(photos), "--model", tiny_model, "--pretrained", "random", "--workers", "0")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-env" / "mmsearch.db").exists()
    info = json.loads(invoke(runner, "info", "--json").stdout)
    assert info["images"] == 6 and info["index"] == str(tmp_path / "from-env")


def test_incremental_rename_change_delete(runner, tmp_path, tiny_model, photos) -> None:
    index = tmp_path / "idx"
    invoke(runner, *index_args(index, tiny_model, photos))
    again = invoke(runner, *index_args(index, tiny_model, photos))
    assert "added 0, updated 0, renamed 0, removed 0, unchanged 6" in again.stderr

    with retrieval.open_index(index, create=False) as idx:
        before = {r.path: r.id for r in idx.search(np.ones(32, np.float32), k=10)}
    os.rename(photos / "img0.jpg", photos / "moved.jpg")
    solid_image(photos / "img1.png", (0, 0, 0))  # same name, new content
    (photos / "img2.webp").unlink()
    result = invoke(runner, *index_args(index, tiny_model, photos))
    assert "added 0, updated 1, renamed 1, removed 1, unchanged 3" in result.stderr
    with retrieval.open_index(index, create=False) as idx:
        after = {r.path: r.id for r in idx.search(np.ones(32, np.float32), k=10)}
    assert after[str(photos / "moved.jpg")] == before[str(photos / "img0.jpg")]  # not embedded again
    assert str(photos / "img2.webp") not in after and len(after) == 5


def test_missing_root_is_never_wiped(runner, tmp_path, tiny_model, photos) -> None:
    index = tmp_path / "idx"
    invoke(runner, *index_args(index, tiny_model, photos))
    shutil.move(photos, tmp_path / "unmounted")
    result = invoke(runner, "index", "--index", str(index), "--workers", "0")  # bare: re-scan known roots
    assert result.exit_code == 0
    assert "missing" in result.stderr and "removed 0" in result.stderr
    assert json.loads(invoke(runner, "info", "--index", str(index), "--json").stdout)["images"] == 6
    explicit = invoke(runner, *index_args(index, tiny_model, photos))
    assert explicit.exit_code != 0 and "no such file or folder" in explicit.stderr
    assert json.loads(invoke(runner, "info", "--index", str(index), "--json").stdout)["images"] == 6


def test_remove_takes_out_folders_even_when_gone_from_disk(runner, tmp_path, tiny_model, photos) -> None:
    index = tmp_path / "idx"
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a red square\na blue circle\n")
    assert invoke(runner, *index_args(index, tiny_model, photos, corpus)).exit_code == 0
    # Nothing indexed there: a one-line error, and nothing changes.
    wrong = invoke(runner, "remove", str(tmp_path / "elsewhere"), "--index", str(index))
    assert wrong.exit_code == 1 and "nothing indexed at" in wrong.stderr
    assert json.loads(invoke(runner, "info", "--index", str(index), "--json").stdout)["images"] == 6
    # A subfolder of an indexed folder: its file goes now (and a re-scan would bring it back, as it warns).
    sub = invoke(runner, "remove", str(photos / "sub"), "--index", str(index))
    assert sub.exit_code == 0 and "removed 1 files (1 items)" in sub.stderr and "adds it again" in sub.stderr
    paths = {h["path"] for h in query_json(runner, index, "a red square", "-k", "10")}
    assert len(paths) == 5 and not any("/sub/" in p for p in paths)
    # The photo folder deleted from disk: `remove` is how it leaves the index for good.
    shutil.rmtree(photos)
    gone = invoke(runner, "remove", str(photos), "--index", str(index))
    assert gone.exit_code == 0 and "removed 5 files (5 items)" in gone.stderr and str(photos) in gone.stderr
    info = json.loads(invoke(runner, "info", "--index", str(index), "--json").stdout)
    assert (info["images"], info["texts"], info["roots"]) == (0, 2, [str(corpus)])
    rescan = invoke(runner, "index", "--index", str(index), "--workers", "0")
    assert rescan.exit_code == 0 and "missing" not in rescan.stderr
    texts = query_json(runner, index, "a red square", "--target", "all", "-k", "10")
    assert [h["kind"] for h in texts] == ["text", "text"]


def test_text_corpora_and_image_query(runner, tmp_path, tiny_model, photos) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "captions.txt").write_text("a red circle\n\n  \na blue star\n" + "word " * 200 + "\n")
    (corpus / "records.jsonl").write_text(json.dumps({"caption": "green square"}) + "\n" + json.dumps({"text": "a cat"}) + "\n")
    (corpus / "table.csv").write_text("id,body\n1,white cross\n2,black triangle\n")
    index = tmp_path / "idx"
    result = invoke(runner, *index_args(index, tiny_model, corpus / "captions.txt", corpus / "records.jsonl"))
    assert result.exit_code == 0, result.output
    assert "5 texts" in result.stderr and "1 truncated" in result.stderr
    csv_run = invoke(runner, *index_args(index, tiny_model, corpus / "table.csv"), "--text-field", "body")
    assert "2 texts" in csv_run.stderr
    invoke(runner, *index_args(index, tiny_model, photos))

    hits = query_json(runner, index, "--image", str(photos / "img0.jpg"), "-k", "20")
    assert {h["kind"] for h in hits} == {"text"}  # default target for an image query: texts
    by_text = {h["text"]: h for h in hits}
    assert by_text["a blue star"]["line"] == 4 and by_text["a blue star"]["path"] == str(corpus / "captions.txt")
    assert by_text["a cat"]["line"] == 2 and by_text["black triangle"]["line"] == 2
    assert len(hits) == 7
    both = query_json(runner, index, "a red circle", "--target", "all", "-k", "50")
    assert {h["kind"] for h in both} == {"image", "text"} and len(both) == 13
    texts = query_json(runner, index, "a red circle", "--target", "texts", "-k", "1")
    assert texts[0]["text"] == "a red circle" and texts[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_model_is_recorded_and_enforced(runner, tmp_path, tiny_model, photos) -> None:
    import open_clip
    import torch

    index = tmp_path / "idx"
    invoke(runner, *index_args(index, tiny_model, photos))
    info = json.loads(invoke(runner, "info", "--index", str(index), "--json").stdout)
    assert info["model"]["name"] == tiny_model and info["model"]["dim"] == 32
    other = invoke(runner, "index", str(photos), "--index", str(index), "--model", "shapes-mini")
    assert other.exit_code != 0 and "built with" in other.stderr
    # A local checkpoint of the same architecture is other weights: refused too.
    open_clip.add_model_config(tiny_model)
    ckpt = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("tiny-clip").state_dict(), ckpt)
    mixed = invoke(runner, "index", str(photos), "--index", str(index), "--pretrained", str(ckpt))
    assert mixed.exit_code != 0 and "built with" in mixed.stderr
    # A new index from that checkpoint records its sha256.
    fresh = tmp_path / "idx2"
    ok = invoke(runner, "index", str(photos), "--index", str(fresh), "--model", tiny_model, "--pretrained", str(ckpt), "--workers", "0")
    assert ok.exit_code == 0, ok.output
    model = json.loads(invoke(runner, "info", "--index", str(fresh), "--json").stdout)["model"]
    assert model["pretrained"] == str(ckpt) and len(model["checkpoint_sha256"]) == 64


def test_offline_weights_fail_fast_with_a_fix(tmp_path, photos) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MMSEARCH_OFFLINE", "HF_HUB_OFFLINE")}
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "index", str(photos), "--index", str(tmp_path / "idx"),
         "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"],
        capture_output=True, text=True, timeout=60, env=env)
    assert time.monotonic() - start < 10
    assert result.returncode == 1
    assert "--pretrained" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["index", "{tmp}/nope"], "no such file or folder"),
        (["index", "{tmp}/photos/notes.md"], "not an image or a text corpus"),
        (["query", "a dog"], "no index at"),
        (["info"], "no index at"),
        (["index", "{tmp}/photos", "--model", "no-such-model"], "unknown model"),
        (["index", "{tmp}/photos", "--model", "{model}", "--pretrained", "{tmp}/missing.pt"], "checkpoint not found"),
    ],
)
def test_user_errors_are_one_line(tmp_path, tiny_model, photos, args, message) -> None:
    argv = [a.format(tmp=tmp_path, model=tiny_model) for a in args]
    result = run_mmsearch(*argv, "--index", str(tmp_path / "idx"))
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_query_errors(runner, tmp_path, tiny_model, photos) -> None:
    index = tmp_path / "idx"
    invoke(runner, *index_args(index, tiny_model, photos))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    for args, message in [
        (["--image", str(bad)], "cannot read query image"),
        (["--image", str(tmp_path / "absent.jpg")], "not found"),
        (["a dog", "--target", "texts"], "holds no texts"),
        (["   "], "empty query"),
    ]:
        result = invoke(runner, "query", *args, "--index", str(index))
        assert result.exit_code == 1 and message in result.stderr, (args, result.output)
    usage = invoke(runner, "query", "--index", str(index))
    assert usage.exit_code == 2


def test_under_filters_by_folder_and_reindex_forces_a_layout(runner, tmp_path, tiny_model, photos) -> None:
    index = tmp_path / "idx"
    for i in range(4):
        solid_image(photos / "sub" / f"extra{i}.png", (i * 60, 200, 10))
    invoke(runner, *index_args(index, tiny_model, photos))
    hits = query_json(runner, index, "a red square", "--under", str(photos / "sub"), "-k", "3")
    assert len(hits) == 3 and all(h["path"].startswith(str(photos / "sub") + os.sep) for h in hits)
    assert len(query_json(runner, index, "a red square", "--under", str(photos / "sub"), "-k", "50")) == 5
    assert query_json(runner, index, "a red square", "--under", str(tmp_path / "elsewhere")) == []
    before = query_json(runner, index, "a red square", "-k", "10")
    forced = invoke(runner, "reindex", "--index", str(index), "--faiss", "HNSW32")
    assert forced.exit_code == 0 and "image: HNSW32" in forced.stderr
    assert json.loads(invoke(runner, "info", "--index", str(index), "--json").stdout)["layouts"]["image"] == "HNSW32"
    after = query_json(runner, index, "a red square", "-k", "10")
    assert [h["path"] for h in after] == [h["path"] for h in before]  # 10 items: the graph is exact
    bad = invoke(runner, "reindex", "--index", str(index), "--faiss", "no-such-layout")
    assert bad.exit_code == 1 and "bad FAISS layout" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert json.loads(invoke(runner, "info", "--index", str(index), "--json").stdout)["layouts"]["image"] == "HNSW32"
    invoke(runner, *index_args(index, tiny_model, photos))  # a later run keeps the layout the user chose
    assert json.loads(invoke(runner, "info", "--index", str(index), "--json").stdout)["layouts"]["image"] == "HNSW32"


def test_max_memory_picks_a_compressed_layout_and_reports_its_recall(runner, tmp_path, tiny_model, photos) -> None:
    """`reindex --max-memory` re-lays the vectors out within the budget, tuned (info shows the
    recall it reaches), queries re-rank from the database's exact vectors; 0 clears it."""
    index = tmp_path / "idx"
    corpus = tmp_path / "texts" / "lines.txt"
    corpus.parent.mkdir()
    colours = ["red", "green", "blue", "yellow", "black"]
    corpus.write_text("".join(f"a {colours[i % 5]} shape number {i * 7919 % 1201} in box {i}\n" for i in range(1200)))
    assert invoke(runner, *index_args(index, tiny_model, photos, corpus)).exit_code == 0
    info = json.loads(invoke(runner, "info", "--index", str(index), "--json").stdout)
    assert info["layouts"]["text"] == "Flat" and info["max_memory"] is None
    query = ["--image", str(photos / "img0.jpg"), "--target", "texts", "-k", "10"]
    exact = query_json(runner, index, *query)

    done = invoke(runner, "reindex", "--index", str(index), "--max-memory", "60KB")
    assert done.exit_code == 0 and "text: " in done.stderr and "recall@10" in done.stderr
    info = json.loads(invoke(runner, "info", "--index", str(index), "--json").stdout)
    vec = info["vector_index"]["text"]
    assert "PQ" in info["layouts"]["text"] and info["max_memory"] == 60_000
    assert (index / "vectors-text.faiss").stat().st_size <= 60_000  # the budget holds on disk too
    assert vec["params"]["rerank"] > 0 and 0 < vec["tuning"]["recall"] <= 1 and vec["tuning"]["cross_queries"] == 6
    assert "tuned:    text:" in invoke(runner, "info", "--index", str(index)).stdout
    hits = query_json(runner, index, *query)
    assert len(hits) == 10
    truth = {h["id"]: h["score"] for h in exact}
    common = [h for h in hits if h["id"] in truth]
    assert len(common) >= 8  # re-ranked candidates: the top-10 mostly agrees with exact search
    assert all(abs(h["score"] - truth[h["id"]]) < 1e-4 for h in common)  # and scores are exact cosines
    assert len(query_json(runner, index, *query, "--under", str(corpus.parent))) == 10
    invoke(runner, *index_args(index, tiny_model, photos))  # a later run keeps the budget
    assert json.loads(invoke(runner, "info", "--index", str(index), "--json").stdout)["max_memory"] == 60_000
    assert invoke(runner, *index_args(index, tiny_model, photos), "--max-memory", "0.05MB").exit_code == 0
    info = json.loads(invoke(runner, "info", "--index", str(index), "--json").stdout)  # index sets it too
    assert info["max_memory"] == 50_000 and (index / "vectors-text.faiss").stat().st_size <= 50_000

    assert invoke(runner, "reindex", "--index", str(index), "--max-memory", "0").exit_code == 0
    info = json.loads(invoke(runner, "info", "--index", str(index), "--json").stdout)
    assert info["layouts"]["text"] == "Flat" and info["max_memory"] is None
    bad = invoke(runner, "reindex", "--index", str(index), "--max-memory", "lots")
    assert bad.exit_code == 2 and "memory size" in bad.output
