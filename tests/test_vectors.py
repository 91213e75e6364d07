"""Tests of retrieval.vectors: exact/approximate search, removal, filters, persistence."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval import vectors as vx
from retrieval.errors import MMSearchError
from retrieval.vectors import VectorFileDamaged, VectorIndex, choose_layout

LAYOUTS = ["Flat", "SQ8", "HNSW16", "HNSW16,SQ8", "HNSW16,SQfp16", "IVF8,Flat",
           # the large-collection and memory-budget layouts (IVF with an HNSW coarse quantizer)
           "IVF8_HNSW32,PQ8x4fs,Refine(SQfp16)", "OPQ4,IVF8_HNSW32,PQ4x4fs"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny indexes: one thread is faster than OpenMP hand-offs on a loaded 2-core box."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def two_clusters(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Points around +e0 and -e0 (far apart: cosine ~ -0.8) and the cluster of each point."""
    side = np.where(np.arange(n) % 2 == 0, 1.0, -1.0).astype(np.float32)
    x = rng.standard_normal((n, d)).astype(np.float32) * 0.15
    x[:, 0] += side
    return x / np.linalg.norm(x, axis=1, keepdims=True), side


def exact_topk(x: np.ndarray, ids: np.ndarray, q: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ x.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), ids[order]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    x = unit(rng, 800, 24)
    # sparse, large, unordered row ids: labels must not be confused with positions
    ids = rng.choice(10**12, size=len(x), replace=False).astype(np.int64)
    return ids, x, unit(rng, 20, 24)


def test_error_type() -> None:
    assert issubclass(VectorFileDamaged, MMSearchError)


def test_exact_search_returns_true_topk_with_cosine_scores(data) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids, x, dim=24)
    assert index.layout == "Flat" and len(index) == len(ids)
    scores, got = index.search(q, 10)
    assert scores.dtype == np.float32 and got.dtype == np.int64 and got.shape == (20, 10)
    want_scores, want_ids = exact_topk(x, ids, q, 10)
    np.testing.assert_array_equal(got, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    # a single 1-D query is accepted
    s1, i1 = index.search(q[0], 10)
    np.testing.assert_array_equal(i1[0], want_ids[0])


def test_k_larger_than_collection_pads(data) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids[:5], x[:5], dim=24)
    scores, got = index.search(q[:2], 8)
    assert (got[:, :5] >= 0).all() and (got[:, 5:] == -1).all()
    assert np.isneginf(scores[:, 5:]).all()
    assert set(got[0, :5]) == set(ids[:5])


def test_empty_index() -> None:
    index = VectorIndex.build(np.empty(0, np.int64), np.empty((0, 8), np.float32), dim=8)
    assert len(index) == 0 and index.layout == "Flat"
    scores, got = index.search(np.ones((1, 8), np.float32), 3)
    assert (got == -1).all()
    index.add(np.array([5]), np.eye(8, dtype=np.float32)[:1])
    assert index.search(np.eye(8, dtype=np.float32)[:1], 3)[1][0, 0] == 5


def test_approximate_layout_has_high_recall() -> None:
    rng = np.random.default_rng(3)
    x, q = unit(rng, 2000, 32), unit(rng, 50, 32)
    ids = np.arange(100, 2100, dtype=np.int64)
    index = VectorIndex.build(ids, x, dim=32, layout="HNSW32")
    assert index.layout == "HNSW32" and index.params["efSearch"] > 0
    scores, got = index.search(q, 10)
    want_scores, want_ids = exact_topk(x, ids, q, 10)
    assert recall(got, want_ids) >= 0.95
    # reported scores are the true cosines of the returned ids
    pos = {int(i): j for j, i in enumerate(ids)}
    true = np.array([[x[pos[int(i)]] @ qq for i in row] for row, qq in zip(got, q)])
    np.testing.assert_allclose(scores, true, atol=1e-5)


def test_default_approximate_layout_scores_are_cosines() -> None:
    """The auto layout stores float16 codes: recall and scores stay close to exact."""
    rng = np.random.default_rng(4)
    x, q = unit(rng, 2000, 32), unit(rng, 50, 32)
    ids = np.arange(2000, dtype=np.int64)
    index = VectorIndex.build(ids, x, dim=32, layout=vx.APPROX_LAYOUT)
    scores, got = index.search(q, 10)
    assert recall(got, exact_topk(x, ids, q, 10)[1]) >= 0.95
    true = np.take_along_axis(q @ x.T, got, axis=1)
    np.testing.assert_allclose(scores, true, atol=1e-3)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_removed_ids_never_returned(layout: str, data) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids, x, dim=24, layout=layout)
    # remove exactly the current top hits so a stale entry would surely show up
    _, top = index.search(q, 10)
    gone = np.unique(np.concatenate([top.ravel(), ids[::3]]))
    index.remove(gone)
    index.remove(np.array([-5, 123]))  # unknown ids are ignored
    assert len(index) == len(ids) - len(gone)
    np.testing.assert_array_equal(index.ids(), np.sort(np.setdiff1d(ids, gone)))
    _, got = index.search(q, 10)
    assert not np.isin(got, gone).any()
    assert (got >= 0).all()  # still k results from the survivors
    # also under a filter that mixes removed and live ids
    allowed = np.concatenate([gone[:50], np.setdiff1d(ids, gone)[:30]])
    _, got = index.search(q, 10, allowed=allowed)
    assert not np.isin(got, gone).any() and np.isin(got, allowed).all() and (got >= 0).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_add_replaces_existing_id(layout: str, data) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids, x, dim=24, layout=layout)
    index.add(ids[:1], q[:1])  # id 0 now points at the query itself
    assert len(index) == len(ids)
    current = dict(zip(ids[1:].tolist(), x[1:])) | {int(ids[0]): q[0]}  # the "database"
    scores, got = index.search(q[:1], 3, exact=lambda want: np.stack([current[int(i)] for i in want]))
    assert got[0, 0] == ids[0] and scores[0, 0] == pytest.approx(1.0, abs=1e-2)
    assert np.count_nonzero(got[0] == ids[0]) == 1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("path", ["default", "scan", "beam"])
def test_allowed_restricts_and_fills_k(layout: str, path: str, monkeypatch) -> None:
    # small sets normally take the gather path; force the filtered scan and the widened beam
    if path in ("scan", "beam"):
        monkeypatch.setattr(vx, "ALLOWED_GATHER_MAX", 0)
    monkeypatch.setattr(vx, "EXACT_PREFERENCE", {"default": vx.EXACT_PREFERENCE,
                                                  "scan": float("inf"), "beam": 0.0}[path])
    monkeypatch.setattr(vx, "IVF_EXACT_SCAN_NS", {"default": vx.IVF_EXACT_SCAN_NS,
                                                   "scan": float("inf"), "beam": -1.0}[path])
    rng = np.random.default_rng(11)
    x, side = two_clusters(rng, 1000, 16)
    ids = np.arange(10_000, 11_000, dtype=np.int64)
    index = VectorIndex.build(ids, x, dim=16, layout=layout)
    q = x[side > 0][:5] + 0.01  # queries sit in the +e0 cluster
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    far = ids[side < 0]
    exact = lambda want: x[want - 10_000]  # noqa: E731 - the database (compressed codes re-rank)
    for allowed in (far[:15], far[::3], ids[::2]):  # tiny far set, large far set, broad set
        scores, got = index.search(q, 10, allowed=allowed, exact=exact)
        assert np.isin(got, allowed).all(), layout  # -1 would fail too: k results wanted
        # the best allowed item is found (exact path or widened beam)
        best = exact_topk(x[np.isin(ids, allowed)], ids[np.isin(ids, allowed)], q, 1)[1][:, 0]
        assert recall(got, best[:, None]) >= 0.8
    # fewer allowed than k: all of them, then padding
    _, got = index.search(q, 10, allowed=far[:4])
    assert (np.sort(got[:, :4], axis=1) == np.sort(far[:4])).all() and (got[:, 4:] == -1).all()
    # nothing allowed exists
    _, got = index.search(q, 10, allowed=np.array([1, 2, 3]))
    assert (got == -1).all()


def test_filtered_beam_falls_back_to_exact(monkeypatch) -> None:
    """When the graph beam cannot reach the allowed items, rows are scored exactly."""
    rng = np.random.default_rng(5)
    x, side = two_clusters(rng, 1000, 16)
    ids = np.arange(1000, dtype=np.int64)
    index = VectorIndex.build(ids, x, dim=16, layout="HNSW16")
    monkeypatch.setattr(vx, "ALLOWED_GATHER_MAX", 0)
    monkeypatch.setattr(vx, "EXACT_PREFERENCE", 0.0)
    monkeypatch.setattr(vx, "MAX_EF_SEARCH", 10)  # beam of 10 near +e0: no allowed item
    q = x[side > 0][:3]
    allowed = ids[side < 0][:100]
    calls = []
    real_exact = VectorIndex._exact
    def spy(self, qq, k, sel, *rest):
        calls.append(len(qq))
        return real_exact(self, qq, k, sel, *rest)

    monkeypatch.setattr(VectorIndex, "_exact", spy)
    scores, got = index.search(q, 10, allowed=allowed)
    assert calls == [3]  # all three rows came back short from the beam
    want_scores, want_ids = exact_topk(x[allowed], allowed, q, 10)
    np.testing.assert_array_equal(got, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


@pytest.mark.parametrize("layout", ["Flat", "HNSW16,SQ8", "IVF8,Flat"])
@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_roundtrip(layout: str, mmap: bool, data, tmp_path: Path) -> None:
    ids, x, q = data
    index = VectorIndex.build(ids, x, dim=24, layout=layout)
    index.remove(ids[:100])
    index.params = {**index.params}
    if "efSearch" in index.params:
        index.params["efSearch"] = 77  # a non-default value must survive
    before = index.search(q, 10)
    path = tmp_path / "vectors.faiss"
    index.save(path, generation=42)
    loaded, gen = VectorIndex.load(path, dim=24, mmap=mmap)
    assert gen == 42 and loaded.layout == layout and loaded.params == index.params
    assert len(loaded) == len(index) and loaded.tombstones == index.tombstones
    np.testing.assert_array_equal(loaded.ids(), index.ids())
    after = loaded.search(q, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], atol=1e-6)
    # a loaded (possibly memory-mapped) index can still be changed and saved again
    loaded.remove(ids[100:110])
    loaded.add(np.array([-7]), q[:1])
    assert loaded.search(q[:1], 1)[1][0, 0] == -7
    loaded.save(path, generation=43)
    again, gen = VectorIndex.load(path, dim=24, verify=True)
    assert gen == 43 and len(again) == len(loaded)
    assert not np.isin(again.search(q, 10)[1], ids[:110]).any()
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.faiss"]


def test_damaged_files_raise(data, tmp_path: Path) -> None:
    ids, x, _ = data
    path = tmp_path / "v.faiss"
    VectorIndex.build(ids, x, dim=24, layout="HNSW16").save(path, generation=1)
    good = path.read_bytes()

    with pytest.raises(VectorFileDamaged):
        VectorIndex.load(tmp_path / "missing.faiss", dim=24)
    with pytest.raises(VectorFileDamaged, match="dim"):
        VectorIndex.load(path, dim=32)
    for cut in (0, 10, len(good) // 2, len(good) - 1):
        path.write_bytes(good[:cut])
        with pytest.raises(VectorFileDamaged):
            VectorIndex.load(path, dim=24)
    path.write_bytes(np.random.default_rng(0).bytes(len(good)))
    with pytest.raises(VectorFileDamaged):
        VectorIndex.load(path, dim=24)
    path.write_bytes(b"\0" * len(good))  # zeroed blocks after a torn write
    with pytest.raises(VectorFileDamaged):
        VectorIndex.load(path, dim=24)
    for pos in (5, len(good) // 3, len(good) - 70):  # one flipped byte in data / metadata
        bad = bytearray(good)
        bad[pos] ^= 0xFF
        path.write_bytes(bytes(bad))
        with pytest.raises(VectorFileDamaged):
            VectorIndex.load(path, dim=24, verify=True)


def test_save_is_atomic(data, tmp_path: Path, monkeypatch) -> None:
    ids, x, q = data
    path = tmp_path / "v.faiss"
    old = VectorIndex.build(ids[:300], x[:300], dim=24)
    old.save(path, generation=1)
    old_bytes = path.read_bytes()
    new = VectorIndex.build(ids, x, dim=24, layout="HNSW16")

    calls = {"n": 0}
    real = vx._write_bytes

    def failing(f, chunk):  # write part of the data, then die like a full disk would
        calls["n"] += 1
        if calls["n"] == 2:
            real(f, chunk[: len(chunk) // 2])
            raise OSError(28, "No space left on device")
        real(f, chunk)

    monkeypatch.setattr(vx, "_write_bytes", failing)
    with pytest.raises(OSError, match="No space"):
        new.save(path, generation=2)
    assert calls["n"] == 2
    assert path.read_bytes() == old_bytes
    assert [p.name for p in tmp_path.iterdir()] == ["v.faiss"]  # temp file cleaned up
    loaded, gen = VectorIndex.load(path, dim=24)
    assert gen == 1 and len(loaded) == 300

    monkeypatch.setattr(vx, "_write_bytes", real)
    new.save(path, generation=2)
    assert VectorIndex.load(path, dim=24)[1] == 2


def test_choose_layout_threshold() -> None:
    limit = vx.FLAT_MAX_FLOATS // 512
    assert choose_layout(0, 512) == "Flat"
    assert choose_layout(limit, 512) == "Flat"
    assert choose_layout(limit + 1, 512) == vx.APPROX_LAYOUT != "Flat"
    assert choose_layout(500_000, 512) == vx.APPROX_LAYOUT
    # the cost of a scan is n * dim: smaller vectors stay exact for longer
    assert choose_layout(limit + 1, 256) == "Flat"
    # an HNSW build over the CPU budget: IVF over fast-scan PQ with a float16 refine copy
    assert vx.hnsw_build_cpu_s(1_000_000, 512) > vx.BUILD_BUDGET_CPU_S
    assert choose_layout(1_000_000, 512) == "IVF2048_HNSW32,PQ128x4fs,Refine(SQfp16)"
    assert choose_layout(1_000_000, 512, build_budget_s=1e9) == vx.APPROX_LAYOUT


def test_memory_budget_picks_a_layout_that_fits() -> None:
    raw = 1_000_000 * 512 * 4
    assert choose_layout(1_000_000, 512, max_memory=2 * raw) == choose_layout(1_000_000, 512)
    for budget in (300e6, 100e6, 40e6):
        layout = choose_layout(1_000_000, 512, max_memory=int(budget))
        assert "PQ" in layout and "Refine" not in layout  # re-ranked from the database instead
        assert vx.layout_bytes(layout, 1_000_000, 512) <= budget
    # the most accurate layout that fits: longer codes for the larger budget
    assert choose_layout(1_000_000, 512, max_memory=300_000_000) == "IVF2048_HNSW32,PQ256x4fs"
    assert choose_layout(1_000_000, 512, max_memory=40_000_000).startswith("OPQ")
    with pytest.raises(ValueError, match="no layout fits"):
        choose_layout(1_000_000, 512, max_memory=10_000_000)
    # small collections: Flat while it fits
    assert choose_layout(1000, 512, max_memory=10_000_000) == "Flat"


def test_needs_rebuild(monkeypatch, data) -> None:
    ids, x, _ = data
    monkeypatch.setattr(vx, "FLAT_MAX_FLOATS", 500 * 24)
    flat = VectorIndex.build(ids[:450], x[:450], dim=24)
    assert flat.layout == "Flat" and not flat.needs_rebuild()
    flat.add(ids[450:550], x[450:550])  # outgrew exact search
    assert flat.needs_rebuild()

    approx = VectorIndex.build(ids, x, dim=24)  # 800 > 500: approximate
    assert approx.layout == vx.APPROX_LAYOUT and not approx.needs_rebuild()
    approx.remove(ids[: int(0.25 * len(ids))])  # > 20 % tombstones
    assert approx.tombstones > 0 and approx.needs_rebuild()
    # grown twice over since it was tuned: chosen and tuned again
    monkeypatch.setattr(vx, "FLAT_MAX_FLOATS", 200 * 24)
    grown = VectorIndex.build(ids[:300], x[:300], dim=24)
    assert grown.layout == vx.APPROX_LAYOUT and grown.tuning["n"] == 300
    grown.add(ids[300:600], x[300:600])
    assert not grown.needs_rebuild()
    grown.add(ids[600:601], x[600:601])
    assert grown.needs_rebuild() and not grown.needs_rebuild(keep_layout=True)
    monkeypatch.setattr(vx, "FLAT_MAX_FLOATS", 500 * 24)
    small = VectorIndex.build(ids[:200], x[:200], dim=24, layout="HNSW16")
    assert small.needs_rebuild()  # far below the threshold: Flat is better
    # a layout the user chose is kept; only tombstones still ask for a rebuild
    assert not small.needs_rebuild(keep_layout=True)
    small.remove(ids[:50])
    assert small.needs_rebuild(keep_layout=True)


def blobs(rng: np.random.Generator, n: int, d: int, centres: int = 40) -> np.ndarray:
    """Unit vectors around random centres: neighbours exist, as in real embeddings."""
    c = unit(rng, centres, d)
    x = c[rng.integers(0, centres, n)] + rng.standard_normal((n, d)).astype(np.float32) * 0.25 / np.sqrt(d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("layout", ["HNSW16,SQfp16", "IVF32_HNSW32,PQ8x4fs,Refine(SQfp16)",
                                    "IVF32_HNSW32,PQ8x4fs"])
def test_build_tunes_to_the_target_recall(layout: str, tmp_path: Path) -> None:
    """The chosen efSearch / nprobe reaches the target on held-out queries too, a stricter
    target never picks a smaller one, and the outcome survives save/load."""
    rng = np.random.default_rng(21)
    x = blobs(rng, 4000, 32)
    ids = np.arange(1, 4001, dtype=np.int64)
    exact = lambda want: x[want - 1]  # noqa: E731 - the database, for compressed codes
    text = blobs(np.random.default_rng(22), 50, 32)  # "the other modality"
    index = VectorIndex.build(ids, x, dim=32, layout=layout, cross_queries=text)
    knob = "efSearch" if layout.startswith("HNSW") else "nprobe"
    t = index.tuning
    assert t["target_recall"] == vx.TARGET_RECALL and t["recall"] >= vx.TARGET_RECALL
    assert t["queries"] == vx.TUNE_QUERIES and t["cross_queries"] == 50 and t["n"] == 4000
    assert len(index) == 4000 and set(index.ids()) == set(ids)  # held-out rows are added back
    # fresh queries of the same data: recall near what the tuning measured
    q = blobs(np.random.default_rng(21), 4200, 32)[4000:]  # same centres, new points
    got = index.search(q, 10, exact=exact)[1]
    assert recall(got, exact_topk(x, ids, q, 10)[1]) >= 0.9
    strict = VectorIndex.build(ids, x, dim=32, layout=layout, target_recall=0.999)
    assert strict.params[knob] >= index.params[knob] and strict.tuning["target_recall"] == 0.999
    path = tmp_path / "v.faiss"
    index.save(path, generation=3)
    loaded, _ = VectorIndex.load(path, dim=32)
    assert loaded.tuning == index.tuning and loaded.params == index.params
    assert loaded.describe()["tuning"]["recall"] == t["recall"]


def low_rank(rng: np.random.Generator, n: int, d: int, rank: int,
             offset: np.ndarray | float = 0.0) -> np.ndarray:
    """Unit vectors near a ``rank``-dimensional subspace, off-centre like CLIP's (their
    mean is far from zero)."""
    basis = np.random.default_rng(0).standard_normal((rank, d)).astype(np.float32) / np.sqrt(rank)
    x = rng.standard_normal((n, rank)).astype(np.float32) @ basis
    x += rng.standard_normal((n, d)).astype(np.float32) * 0.05 + offset
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_spectrum_decides_a_projected_graph() -> None:
    rng = np.random.default_rng(30)
    assert vx.reduced_dim(low_rank(rng, 3000, 128, 8)) == 16
    assert vx.reduced_dim(low_rank(rng, 3000, 512, 24)) == 32
    assert vx.reduced_dim(unit(rng, 3000, 128)) is None  # variance spread over every dimension
    assert vx.reduced_dim(low_rank(rng, 3000, 32, 4)) is None  # would keep > dim/4
    # a projected graph builds far faster, so it stays in budget where plain HNSW does not
    assert vx.hnsw_build_cpu_s(1_000_000, 32) < vx.BUILD_BUDGET_CPU_S < vx.hnsw_build_cpu_s(1_000_000, 512)
    assert choose_layout(1_000_000, 512, reduced=32) == "PCA32,HNSW32,Refine(SQfp16)"
    assert choose_layout(1000, 512, reduced=32) == "Flat"
    # the projected graph plus the float16 copy: ~1.4 KB a vector at d=512, under 1.3x raw
    assert 1.3e9 < vx.layout_bytes("PCA32,HNSW32,Refine(SQfp16)", 1_000_000, 512) < 1.3 * 2.048e9


def test_low_rank_collection_gets_a_projected_graph(monkeypatch, tmp_path: Path) -> None:
    """Above the exact threshold, vectors near a subspace are searched through a graph over
    their projection: recall on new queries, true cosines, filters, removal and replacement
    all hold, and the layout survives save and load."""
    monkeypatch.setattr(vx, "FLAT_MAX_FLOATS", 1000 * 128)
    rng = np.random.default_rng(31)
    offset = unit(rng, 1, 128)[0] * 0.8
    x = low_rank(rng, 6000, 128, 8, offset)
    q = low_rank(np.random.default_rng(32), 50, 128, 8, offset)
    ids = np.arange(1, 6001, dtype=np.int64)
    index = VectorIndex.build(ids, x, dim=128)
    assert index.layout == "PCA16,HNSW32,Refine(SQfp16)"
    assert index.tuning["recall"] >= vx.TARGET_RECALL
    # the projection is not centred: projected inner products follow the true ones up to a
    # constant per query (centred, FAISS's default, they drift by the item's mean component)
    pca = vx._transforms(index._index)[0]
    drift = pca.apply(q) @ pca.apply(x).T - q @ x.T
    assert drift.std(axis=1).max() < 0.002
    scores, got = index.search(q, 10)
    assert recall(got, exact_topk(x, ids, q, 10)[1]) >= 0.9
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, got - 1, axis=1), atol=2e-3)

    path = tmp_path / "v.faiss"
    index.save(path, generation=1)
    loaded, _ = VectorIndex.load(path, dim=128)  # memory-mapped, as a query process loads it
    assert loaded.layout == index.layout and loaded.params == index.params
    np.testing.assert_array_equal(loaded.search(q, 10)[1], got)
    for allowed in (ids[:40], ids[::7]):  # gathered exactly, and a wide filter
        found = loaded.search(q, 10, allowed=allowed)[1]
        assert np.isin(found, allowed).all() and (found >= 0).all()
    gone = np.unique(got)
    loaded.remove(gone)
    assert not np.isin(loaded.search(q, 10)[1], gone).any()
    loaded.add(ids[:1], q[:1])  # id 1 now holds the first query itself
    top_s, top = loaded.search(q[:1], 1)
    assert top[0, 0] == 1 and top_s[0, 0] == pytest.approx(1.0, abs=2e-3)


def test_compressed_layout_reranks_from_exact_vectors() -> None:
    """PQ codes alone misorder neighbours and misstate cosines; with ``exact`` the
    candidates are re-scored: true cosines, and results in allowed sets of any size."""
    rng = np.random.default_rng(23)
    x = blobs(rng, 4000, 32)
    ids = np.arange(1, 4001, dtype=np.int64)
    calls = []

    def exact(want: np.ndarray) -> np.ndarray:
        calls.append(len(want))
        return x[want - 1]

    index = VectorIndex.build(ids, x, dim=32, layout="OPQ4,IVF32_HNSW32,PQ4x4fs")
    q = blobs(np.random.default_rng(23), 4100, 32)[4000:]
    truth = exact_topk(x, ids, q, 10)[1]
    plain_scores, plain = index.search(q, 10)
    scores, got = index.search(q, 10, exact=exact)
    assert calls and recall(got, truth) > recall(plain, truth)
    np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, got - 1, axis=1), atol=1e-5)
    for share in (0.001, 0.01, 0.1, 0.5):  # filtered search keeps returning k results
        allowed = np.sort(rng.choice(ids, max(1, int(share * len(ids))), replace=False))
        for fn in (exact, None):
            s, got = index.search(q[:5], 10, allowed=allowed, exact=fn)
            want = min(10, len(allowed))
            assert (got[:, :want] >= 0).all() and np.isin(got[:, :want], allowed).all(), share
