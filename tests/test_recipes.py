"""Issue 15 without schema changes: combined queries, --not, relevance cut-offs, near-duplicates, --collapse.

Most tests share one index of the bundled demo corpus built with shapes-mini; every expected score is
recomputed here from the stored vectors and the model, so a feature that only looked right would fail.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrieval
from conftest import REPO, run_mmsearch
from retrieval.calibrate import SAMPLE_SIZE, sample_ids
from retrieval.compose import item_vectors, parse_weight
from retrieval import dupes
from retrieval.dupes import group_rows
from retrieval.query_cache import QueryCache

DEMO = REPO / "index_data" / "demo"
pytestmark = pytest.mark.skipif(not (REPO / "index_data" / "shapes-mini.pt").exists(), reason="bundled model not built")


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    """The demo corpus (50 images, 60 captions) indexed once for the module."""
    where = tmp_path_factory.mktemp("demo-index") / "idx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMSEARCH_OFFLINE", "1")
        mp.setenv("MMSEARCH_CACHE", str(model_cache))
        with retrieval.open_index(where, model=retrieval.DEMO_MODEL) as idx:
            idx.add([DEMO])
    return where


@pytest.fixture
def idx(demo_index: Path):
    with retrieval.open_index(demo_index, create=False) as index:
        yield index


def _unit(vec: np.ndarray) -> np.ndarray:
    return vec / np.linalg.norm(vec)


def _stored(idx: retrieval.Collection, kind: str = "image") -> tuple[list[int], np.ndarray]:
    ids = idx.reader.item_ids(kind).tolist()
    vectors = item_vectors(idx.reader, kind, ids)
    return ids, np.stack([vectors[i] for i in ids])


def _name(result: retrieval.Result) -> str:
    return Path(result.path).name


# --- combined queries ---------------------------------------------------------------------------


def test_weights_are_parsed_only_when_a_number_follows() -> None:
    assert parse_weight("sunset::0.5") == ("sunset", 0.5)
    assert parse_weight("people::-2") == ("people", -2.0)
    assert parse_weight("haze::1e-1") == ("haze", 0.1)
    assert parse_weight("a::b") == ("a::b", 1.0)
    assert parse_weight("ratio::") == ("ratio::", 1.0)
    assert parse_weight("c++::2::3") == ("c++::2", 3.0)
    with pytest.raises(retrieval.BadQuery):
        parse_weight("::0.5")


def test_add_and_subtract_follow_the_documented_formula(idx: retrieval.Collection) -> None:
    star, blue, red = idx.embed_texts(["a star", "blue", "red"])
    want = _unit(star + 0.5 * blue - 2.0 * red)
    ids, stored = _stored(idx)
    expected = sorted(zip((stored @ want).tolist(), ids), reverse=True)[:5]
    got = idx.search("a star", k=5, add=["blue::0.5"], subtract=["red::2"])
    assert [r.id for r in got] == [i for _, i in expected]
    assert np.allclose([r.score for r in got], [s for s, _ in expected], atol=1e-4)
    # The arithmetic changes the answer: a plain "a star" ranks otherwise.
    assert [r.id for r in idx.search("a star", k=5)] != [r.id for r in got]


def test_empty_add_and_subtract_lists_are_the_plain_query(idx: retrieval.Collection) -> None:
    plain = idx.search("a blue star", k=8)
    assert idx.search("a blue star", k=8, add=[], subtract=[]) == plain
    assert idx.search(["a blue star"], k=8, add=(), subtract=()) == plain


def test_image_and_text_together_and_several_images_averaged(idx: retrieval.Collection) -> None:
    circle, star = DEMO / "red_circle_01.jpg", DEMO / "blue_star_01.webp"
    e_circle, e_star = idx.embed_images([circle, star])
    e_text = idx.embed_texts(["blue"])[0]
    ids, stored = _stored(idx)
    # A text in the query: images by default (by meaning alone: the demo's file names say "blue").
    mixed = idx.search([circle, "blue"], k=3, mode="semantic")
    assert all(r.kind == "image" for r in mixed)
    assert np.isclose(mixed[0].score, float(stored[ids.index(mixed[0].id)] @ _unit(e_circle + e_text)), atol=1e-4)
    assert max(stored @ _unit(e_circle + e_text)) == pytest.approx(mixed[0].score, abs=1e-4)
    averaged = idx.search([circle, star], k=3)  # images only: captions by default
    t_ids, t_stored = _stored(idx, "text")
    best = int(np.argmax(t_stored @ _unit((e_circle + e_star) / 2)))
    assert averaged[0].kind == "text" and averaged[0].id == t_ids[best]


def test_text_parts_are_cached_like_a_plain_query(idx: retrieval.Collection) -> None:
    idx.search("a green square", k=1, add=["yellow::0.3"], subtract=["black"], exclude=["white"])
    cache = QueryCache(idx.directory / "query-cache", repr(idx.manifest.identity()))
    for text in ("a green square", "yellow", "black", "white"):
        assert cache.get(text) is not None, text


def test_not_drops_what_matches_the_excluded_text_better_and_still_returns_k(idx: retrieval.Collection) -> None:
    query, avoid, k = "a yellow circle", "a circle", 5
    ids, stored = _stored(idx)
    q, n = idx.embed_texts([query, avoid])
    passes = {i: float(v @ n) <= float(v @ q) for i, v in zip(ids, stored)}
    # By meaning alone (the demo's file names hold the query's words; hybrid --not is in test_words.py).
    unfiltered = idx.search(query, k=k, mode="semantic")
    assert not any(passes[r.id] for r in unfiltered)  # the plain top-k is all excluded
    got = idx.search(query, k=k, exclude=[avoid], mode="semantic")
    assert len(got) == k and all(passes[r.id] for r in got)
    expected = sorted(((float(v @ q), i) for i, v in zip(ids, stored) if passes[i]), reverse=True)[:k]
    assert [r.id for r in got] == [i for _, i in expected]
    # More asked than pass: all those that pass, and no more.
    assert len(idx.search(query, k=50, exclude=[avoid], mode="semantic")) == sum(passes.values())


def test_bad_combinations_are_typed_errors(idx: retrieval.Collection) -> None:
    for options in ({"add": [""]}, {"add": ["a red circle::-1"]}, {"min_score": "best"}, {"within": -0.1},
                    {"collapse": 1.5}):
        with pytest.raises(retrieval.BadQuery):
            idx.search("a red circle", k=3, **options)


# --- relevance and cut-offs ---------------------------------------------------------------------


def test_sample_is_deterministic_bounded_and_stable_under_additions() -> None:
    ids = np.arange(1, 50_001)
    first = sample_ids(ids)
    assert len(first) == SAMPLE_SIZE and np.array_equal(first, sample_ids(ids[::-1].copy()))
    assert first.min() < 1000 and first.max() > 49_000  # spread over the whole index, not its start
    grown = sample_ids(np.arange(1, 50_101))
    assert len(np.intersect1d(first, grown)) >= SAMPLE_SIZE - 10
    assert np.array_equal(sample_ids(np.arange(5)), np.arange(5))


def test_relevance_is_the_z_score_over_the_sample(idx: retrieval.Collection) -> None:
    _, stored = _stored(idx)  # 51 images: the sample is all of them
    q = idx.embed_texts(["a blue star"])[0]
    scores = stored @ q
    top = idx.search("a blue star", k=1)[0]
    assert top.relevance == pytest.approx((top.score - scores.mean()) / scores.std(), abs=1e-3)
    assert (idx.directory / "sample-image.npz").exists()  # cached beside the vector caches


def test_auto_cut_off_keeps_clear_matches_and_prints_nothing_for_no_match(demo_index: Path) -> None:
    hits = json.loads(run_mmsearch("query", "a blue star", "--index", demo_index, "-k", "50",
                                   "--min-score", "auto", "--json").stdout)
    assert [Path(h["path"]).name.split("_0")[0] for h in hits] == ["blue_star", "blue_star"]
    assert all(h["relevance"] >= 2 for h in hits)
    none = run_mmsearch("query", "a photo of a cat", "--index", demo_index, "--min-score", "auto")
    assert none.returncode == 0 and none.stdout == "" and "no results" in none.stderr


def test_within_keeps_results_close_to_the_best(idx: retrieval.Collection) -> None:
    every = idx.search("a red circle", k=51)
    close = idx.search("a red circle", k=51, within=0.05)
    assert close == [r for r in every if r.score >= every[0].score - 0.05]
    assert 1 < len(close) < len(every)


# --- near-duplicates ----------------------------------------------------------------------------


def test_many_small_groups_are_found_exactly() -> None:
    rng = np.random.default_rng(7)
    n_groups, dim = 3000, 64
    sizes = rng.integers(2, 5, n_groups)
    centers = rng.normal(size=(n_groups, dim))
    members = np.repeat(centers, sizes, axis=0) + rng.normal(scale=0.02, size=(int(sizes.sum()), dim))
    loners = rng.normal(size=(5000, dim))
    vectors = np.concatenate([members, loners]).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = rng.permutation(len(vectors))  # groups scattered across tiles
    truth = np.concatenate([np.repeat(np.arange(n_groups), sizes), -1 - np.arange(5000)])[order]
    groups = group_rows(vectors[order], 0.95)
    assert len(groups) == n_groups
    found = sorted(sorted(truth[g].tolist()) for g in groups)
    assert found == sorted([[g] * int(s) for g, s in enumerate(sizes)])


def test_chains_join_into_one_group() -> None:
    angles = np.arange(6) * 0.25  # neighbours at cos 0.969, ends at cos 0.315
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    assert [g.tolist() for g in group_rows(vectors, 0.95)] == [[0, 1, 2, 3, 4, 5]]


@pytest.fixture
def with_copies(tmp_path: Path, model_cache: Path) -> Path:
    """The demo plus an exact copy and a downscaled copy of one image; indexed."""
    photos = tmp_path / "photos"
    shutil.copytree(DEMO, photos)
    original = photos / "red_circle_02.jpg"
    shutil.copy(original, photos / "copy.jpg")
    with Image.open(original) as img:
        img.resize((img.width // 2, img.height // 2)).save(photos / "small.png")
    built = run_mmsearch("index", photos, "--index", tmp_path / "idx", "--model", "shapes-mini", "-q")
    assert built.returncode == 0, built.stderr
    return tmp_path


def test_dupes_groups_copies_by_resolution_and_changes_nothing(with_copies: Path) -> None:
    index, photos = with_copies / "idx", with_copies / "photos"
    before = sorted(p.name for p in photos.iterdir())
    out = run_mmsearch("dupes", "--index", index, "--threshold", "0.99", "--json")
    assert out.returncode == 0, out.stderr
    groups = json.loads(out.stdout)
    group = next(g for g in groups if any(Path(m["path"]).name == "copy.jpg" for m in g["members"]))
    names = [Path(m["path"]).name for m in group["members"]]
    assert set(names) >= {"red_circle_02.jpg", "copy.jpg", "small.png"}
    pixels = [m["width"] * m["height"] for m in group["members"]]
    assert pixels == sorted(pixels, reverse=True)  # largest first; the downscale comes after both copies
    marked = {Path(m["path"]).name: m["copy_of"] for m in group["members"]}
    pair = {marked["copy.jpg"], marked["red_circle_02.jpg"]}  # one is marked a copy of the other
    assert pair in ({None, str(photos / "copy.jpg")}, {None, str(photos / "red_circle_02.jpg")})
    assert marked["small.png"] is None and group["exact_copies"] == 1
    assert sorted(p.name for p in photos.iterdir()) == before
    table = run_mmsearch("dupes", "--index", index, "--threshold", "0.99")
    assert "nothing was changed" in table.stderr and "= " in table.stdout and "~" in table.stdout


def test_dupes_takes_sizes_from_the_index_and_opens_only_files_without_one(with_copies: Path, monkeypatch) -> None:
    index, photos = with_copies / "idx", with_copies / "photos"
    real = {}
    for path in photos.iterdir():
        if path.suffix == ".txt":  # the captions
            continue
        with Image.open(path) as img:
            real[str(path)] = img.size
    opened: list[str] = []
    monkeypatch.setattr(dupes, "image_size", lambda path: opened.append(path) or real[path])
    # The photos moved away after indexing: their sizes are still known, and no file is opened.
    photos.rename(with_copies / "moved")
    with retrieval.open_index(index, create=False) as idx:
        groups = idx.duplicates(0.99)
        members = [m for g in groups for m in g.members]
        assert len(members) >= 3 and opened == []
        assert {m.path: (m.width, m.height) for m in members} == {m.path: real[m.path] for m in members}
    # A row without a stored size (an index from before 0003 keeps them NULL until a scan) is read from its file.
    small = str(photos / "small.png")
    with sqlite3.connect(index / "mmsearch.db") as db:
        db.execute("UPDATE files SET width = NULL, height = NULL WHERE path = ?", (small,))
    db.close()
    with retrieval.open_index(index, create=False) as idx:
        sized = {m.path: (m.width, m.height) for g in idx.duplicates(0.99) for m in g.members}
    assert opened == [small] and sized[small] == real[small]


def test_collapse_shows_one_result_per_group(with_copies: Path) -> None:
    index = with_copies / "idx"
    plain = json.loads(run_mmsearch("query", "a red circle", "--index", index, "-k", "6", "--json",
                                    "--semantic-only").stdout)
    collapsed = json.loads(run_mmsearch("query", "a red circle", "--index", index, "-k", "6", "--json",
                                        "--collapse", "--semantic-only").stdout)
    copies = {"red_circle_02.jpg", "copy.jpg", "small.png"}
    assert len([h for h in plain if Path(h["path"]).name in copies]) == 3
    assert len([h for h in collapsed if Path(h["path"]).name in copies]) <= 1
    assert len(collapsed) == 6
    with retrieval.open_index(index, create=False) as idx:
        vectors = item_vectors(idx.reader, "image", [h["id"] for h in plain + collapsed])
    shown = np.stack([vectors[h["id"]] for h in collapsed])
    assert (shown @ shown.T - 2 * np.eye(len(shown))).max() < 0.95  # no two shown are near-duplicates
    for hidden in (h for h in plain if h["id"] not in {c["id"] for c in collapsed}):
        above = [vectors[c["id"]] for c in collapsed if c["score"] >= hidden["score"]]
        assert max(float(v @ vectors[hidden["id"]]) for v in above) >= 0.95  # hidden behind one shown above


def test_cli_help_shows_examples_and_bad_values_are_one_line(demo_index: Path) -> None:
    for command in ("query", "dupes"):
        assert "Example" in run_mmsearch(command, "--help").stdout
    bad = run_mmsearch("query", "a red circle", "--index", demo_index, "--add", "")
    assert bad.returncode == 1 and bad.stderr.strip() == "Error: empty query text in ''"
    worse = run_mmsearch("query", "x", "--index", demo_index, "--min-score", "best")
    assert worse.returncode == 2 and "Traceback" not in worse.stderr
