"""The torch-free query path: CLIP tokenizer parity with open_clip, ONNX export fidelity, failures.

Uses a tiny random open_clip model (ViT 2x64 patch 8 at 32 px, text 2x64, context 16, embed 32)
registered from a config file; never a full-size model.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import string
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from retrieval import onnx_export  # noqa: E402
from retrieval.errors import ModelUnavailable  # noqa: E402
from retrieval.onnx_export import export_towers  # noqa: E402
from retrieval.onnx_runtime import OnnxEncoder  # noqa: E402
from retrieval.tokenizer import ClipTokenizer, default_vocab_path, load_merges  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TINY_NAME = "mmsearch-onnx-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
CTX = 16
SIZE = 32

_rng = random.Random(1234)
_WORDS = ["photo", "dog", "Café", "naïve", "über", "日本", "🐶", "&amp;", "don't", "3.14", "!!", "a-b", "x_y"]
LONG_100K = " ".join(_rng.choice(_WORDS) for _ in range(20000))[:100_000]
TEXTS = [
    "a photo of a dog",
    "A Photo Of A DOG.",
    "Hello, world!!! What's up? (really) [x] {y} <z> #tag @user 50% $9.99",
    "café naïve résumé Ångström ÉCOLE",
    "emoji 🐶🐕‍🦺👍🏽 and ✨ sparkles",
    "&amp;lt;b&amp;gt;bold&lt;/b&gt; tom &amp; jerry &quot;q&quot; &#39;s &nbsp;x",
    "  multiple     spaces\t\ttabs\n\nnewlines  ",
    "",
    "   ",
    "<start_of_text> literal special <END_OF_TEXT> tokens",
    "don't we'll they're I'M you've she'd it's",
    "1234567890 3.14159 1,000,000",
    "日本語のテキスト 中文字符 한국어 텍스트",
    "Ελληνικά Кириллица עברית العربية हिन्दी",
    "mojibake â€œquotedâ€\x9d cafÃ©",
    "ﬁ ligature Ⅻ ½ ß ẞ İstanbul ſ",
    "zero\u200bwidth\u00a0nbsp\u2028line",
    "a" * 300,
    "".join(_rng.choice(string.ascii_lowercase) for _ in range(3000)),  # one long BPE word
    "word " * 40,
    LONG_100K,
]


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    config = tmp_path_factory.mktemp("onnx-models") / f"{TINY_NAME}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    return open_clip.create_model(TINY_NAME, pretrained=None).eval()


@pytest.fixture(scope="session")
def export_dir(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx-export") / "tiny"
    with torch.inference_mode():  # callers may hold inference mode; export must still work
        export_towers(tiny, out, context_length=CTX, image_size=SIZE, meta={"arch": TINY_NAME})
    return out


@pytest.fixture(scope="session")
def encoder(export_dir) -> OnnxEncoder:
    return OnnxEncoder(export_dir, threads=1)


@pytest.fixture(scope="session")
def ref_tokenizers(tiny):
    return {CTX: open_clip.get_tokenizer(TINY_NAME), 77: open_clip.get_tokenizer("ViT-B-32")}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


# ------------------------------------------------------------------------------------------
# tokenizer
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ctx", [CTX, 77])
def test_tokenizer_matches_open_clip(ctx, ref_tokenizers):
    ref = ref_tokenizers[ctx]
    assert ref.context_length == ctx and type(ref).__name__ == "SimpleTokenizer"
    mine = ClipTokenizer(default_vocab_path(), ctx)
    expected = ref(TEXTS).numpy()
    got = mine(TEXTS)
    assert got.dtype == np.int64 and got.shape == (len(TEXTS), ctx)
    for text, e, g in zip(TEXTS, expected, got):
        assert g.tolist() == e.tolist(), repr(text[:60])
    assert mine(TEXTS[0]).tolist() == expected[:1].tolist()  # a single str is one row


def test_tokenizer_matches_open_clip_on_random_text(ref_tokenizers):
    rng = random.Random(7)
    alphabet = string.printable + "éèàüößçñ日本語😀🐶ﬁİıſ&;#<>_'\u00a0\u200b"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120))) for _ in range(200)]
    mine = ClipTokenizer(default_vocab_path(), 77)
    assert mine(texts).tolist() == ref_tokenizers[77](texts).tolist()


def test_count_tokens_flags_truncation(ref_tokenizers):
    ref = ref_tokenizers[77]
    tok = ClipTokenizer(default_vocab_path(), CTX)
    for text in TEXTS[:17] + ["word " * 40, LONG_100K]:
        assert tok.count_tokens(text) == len(ref.encode(text)) + 2
    assert tok.count_tokens("") == 2
    assert tok.count_tokens("a photo of a dog") == 7 <= CTX
    assert tok.count_tokens("word " * 40) == 42 > CTX
    row = tok(["word " * 40])[0]
    assert row[-1] == tok.eot_token_id and (row != 0).all()  # truncated: EOT in the last slot


def test_bpe_merge_order_property():
    """The heap BPE equals open_clip's pass-based BPE only if a merged symbol appears solely in
    later merges; check that on the vocabulary file."""
    merges = load_merges(default_vocab_path())
    made_at = {a + b: rank for rank, (a, b) in enumerate(merges)}
    assert len(made_at) == len(merges)
    for rank, (a, b) in enumerate(merges):
        assert made_at.get(a, -1) < rank and made_at.get(b, -1) < rank


def test_tokenizer_rejects_a_bad_vocab(tmp_path):
    bad = tmp_path / "vocab.txt.gz"
    import gzip

    with gzip.open(bad, "wt") as fh:
        fh.write("header\na b\n")
    with pytest.raises(ValueError):
        ClipTokenizer(bad, 77)


# ------------------------------------------------------------------------------------------
# export fidelity
# ------------------------------------------------------------------------------------------
def test_export_metadata(export_dir):
    meta = json.loads((export_dir / "export.json").read_text())
    assert meta["context_length"] == CTX and meta["image_size"] == SIZE and meta["embed_dim"] == 32
    assert meta["opset"] == 17 and meta["model"] == {"arch": TINY_NAME}
    assert set(meta["towers"]) == {"text", "visual", "visual-int8"}
    assert meta["towers"]["text"]["dynamic_length"] is True
    for name in ("text", "visual"):
        assert meta["towers"][name]["min_cosine_vs_torch"] >= 0.999
    assert (export_dir / "bpe_simple_vocab_16e6.txt.gz").is_file()
    assert not list(export_dir.parent.glob(".tiny.*"))  # no temp folder left behind


@pytest.mark.parametrize("n", [1, 3, 9])  # 9 > _FEW_TEXTS: the pre-packed session
def test_text_tower_matches_torch(n, tiny, encoder, ref_tokenizers):
    texts = (TEXTS * 2)[:n]
    got = encoder.embed_texts(texts)
    with torch.no_grad():
        ref = tiny.encode_text(ref_tokenizers[CTX](texts), normalize=True).numpy()
    assert got.dtype == np.float32 and got.shape == (n, 32)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert _cos(got, ref).min() >= 0.999


def test_text_order_is_kept_when_lengths_are_sorted(encoder):
    texts = ["word " * 40, "a", "a red circle on a blue square", "", "dog", "cat " * 3] * 2
    together = encoder.embed_texts(texts)
    alone = np.concatenate([encoder.embed_texts([t]) for t in texts])
    assert _cos(together, alone).min() >= 0.99999


@pytest.mark.parametrize("n", [1, 4])
def test_visual_tower_matches_torch(n, tiny, encoder):
    pixels = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(n))
    got = encoder.embed_pixels(pixels.numpy())
    with torch.no_grad():
        ref = tiny.encode_image(pixels, normalize=True).numpy()
    assert got.dtype == np.float32 and got.shape == (n, 32)
    assert _cos(got, ref).min() >= 0.999


def test_resnet_tower_with_batchnorm(tmp_path):
    """ModifiedResNet (BatchNorm) visual tower: export must neither compute batch statistics nor
    leave the model in training mode (torch's exporter restores a fresh wrapper's train mode)."""
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
        "text_cfg": {"context_length": CTX, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    }
    path = tmp_path / "mmsearch-onnx-tiny-rn.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = open_clip.create_model("mmsearch-onnx-tiny-rn", pretrained=None).eval()
    stats = model.visual.bn1.running_var.clone()
    export_towers(model, tmp_path / "rn", context_length=CTX, image_size=32, towers=("visual",))
    assert not model.training and not any(m.training for m in model.modules())
    assert torch.equal(model.visual.bn1.running_var, stats)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.encode_image(pixels, normalize=True).numpy()
    got = OnnxEncoder(tmp_path / "rn").embed_pixels(pixels.numpy())
    assert _cos(got, ref).min() >= 0.999


def test_encoder_shapes_and_bad_input(encoder):
    assert (encoder.dim, encoder.context_length, encoder.image_size) == (32, CTX, SIZE)
    assert encoder.towers == ("text", "visual")
    assert encoder.embed_texts([]).shape == (0, 32)
    assert encoder.embed_pixels(np.zeros((0, 3, SIZE, SIZE), np.float32)).shape == (0, 32)
    assert encoder.count_tokens("word " * 40) == 42
    with pytest.raises(ValueError):
        encoder.embed_pixels(np.zeros((2, 3, SIZE + 1, SIZE), np.float32))
    with pytest.raises(ValueError):
        encoder.embed_tokens(np.zeros((2, CTX + 1), np.int64))


def test_no_torch_in_a_fresh_process(export_dir):
    code = textwrap.dedent(
        f"""
        import sys
        import retrieval.tokenizer, retrieval.onnx_runtime
        assert "torch" not in sys.modules and "open_clip" not in sys.modules, "imported torch"
        from retrieval.onnx_runtime import OnnxEncoder
        enc = OnnxEncoder({str(export_dir)!r})
        v = enc.embed_texts(["a photo of a dog"])
        assert v.shape == (1, 32), v.shape
        assert "visual" not in enc._sessions, "a text query loaded the visual tower"
        bad = [m for m in ("torch", "open_clip", "onnx") if m in sys.modules]
        assert not bad, bad
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# damaged or missing exports
# ------------------------------------------------------------------------------------------
def _copy(export_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(export_dir, dst)
    return dst


def test_missing_export_dir(tmp_path):
    with pytest.raises(ModelUnavailable, match="no ONNX export"):
        OnnxEncoder(tmp_path / "nope")


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "export.json").unlink(), "export.json is missing"),
        (lambda d: (d / "export.json").write_text("{not json"), "unreadable"),
        (lambda d: (d / "export.json").write_text('{"format": 1}'), "damaged"),
        (lambda d: (d / "export.json").write_text('{"format": 99}'), "format"),
        (lambda d: (d / "text.onnx.data").unlink(), "missing"),
        (lambda d: (d / "visual.onnx").unlink(), "missing"),
        (lambda d: (d / "text.onnx.data").write_bytes(b"\0" * 10), "bytes"),
        (lambda d: (d / "bpe_simple_vocab_16e6.txt.gz").unlink(), "missing"),
    ],
)
def test_damaged_export_is_refused_at_open(export_dir, tmp_path, damage, match):
    d = _copy(export_dir, tmp_path)
    damage(d)
    with pytest.raises(ModelUnavailable, match=match):
        OnnxEncoder(d)


def test_export_from_another_onnxruntime_version_still_runs(export_dir, tmp_path, tiny, ref_tokenizers):
    d = _copy(export_dir, tmp_path)
    meta = json.loads((d / "export.json").read_text())
    meta["towers"]["text"]["optimized_by"]["onnxruntime"] = "0.0.1"  # graph optimized again at load
    (d / "export.json").write_text(json.dumps(meta))
    got = OnnxEncoder(d).embed_texts(["a dog", "a cat"])
    with torch.no_grad():
        ref = tiny.encode_text(ref_tokenizers[CTX](["a dog", "a cat"]), normalize=True).numpy()
    assert _cos(got, ref).min() >= 0.999


def test_corrupt_graph_of_the_same_size_is_refused_at_first_use(export_dir, tmp_path):
    d = _copy(export_dir, tmp_path)
    graph = d / "text.onnx"
    graph.write_bytes(b"\xff" * graph.stat().st_size)
    enc = OnnxEncoder(d)
    with pytest.raises(ModelUnavailable, match="cannot load ONNX text tower"):
        enc.embed_texts(["a dog"])
    assert enc.embed_pixels(np.zeros((1, 3, SIZE, SIZE), np.float32)).shape == (1, 32)


def test_text_only_export_and_atomic_replace(tiny, export_dir, tmp_path, monkeypatch):
    out = _copy(export_dir, tmp_path)
    export_towers(tiny, out, context_length=CTX, image_size=SIZE, towers=("text",))
    enc = OnnxEncoder(out)
    assert enc.towers == ("text",) and not (out / "visual.onnx").exists()
    assert enc.embed_texts(["a dog"]).shape == (1, 32)
    with pytest.raises(ModelUnavailable, match="no visual tower"):
        enc.embed_pixels(np.zeros((1, 3, SIZE, SIZE), np.float32))

    # an export that fails its check leaves the previous export untouched and no temp folder
    before = sorted((p.name, p.stat().st_size) for p in out.iterdir())
    monkeypatch.setattr(onnx_export, "MIN_COSINE", 1.5)
    with pytest.raises(ModelUnavailable, match="disagrees with torch"):
        export_towers(tiny, out, context_length=CTX, image_size=SIZE, towers=("text",))
    assert sorted((p.name, p.stat().st_size) for p in out.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]


def test_export_without_onnx_package_is_a_clear_error(tiny, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    with pytest.raises(ModelUnavailable, match="pip install onnx"):
        export_towers(tiny, tmp_path / "x", context_length=CTX, image_size=SIZE)
    assert not (tmp_path / "x").exists()


def test_export_rejects_bad_towers(tiny, tmp_path):
    with pytest.raises(ValueError):
        export_towers(tiny, tmp_path / "x", context_length=CTX, image_size=SIZE, towers=("audio",))


# ------------------------------------------------------------------------------------------
# int8 image tower
# ------------------------------------------------------------------------------------------
def test_export_has_a_gated_int8_visual_tower(export_dir, encoder):
    meta = json.loads((export_dir / "export.json").read_text())
    gate = meta["int8"]
    assert gate["kept"] and gate["probes"] == 32 and 0.995 <= gate["min_cosine"] < 1.0 and gate["speedup"] > 0
    tower = meta["towers"]["visual-int8"]
    assert tower["bytes"]["visual-int8.onnx.data"] < meta["towers"]["visual"]["bytes"]["visual.onnx.data"]
    pixels = onnx_export.probe_pixels(SIZE, onnx_export.CLIP_MEAN, onnx_export.CLIP_STD)
    int8 = OnnxEncoder(export_dir, precision="int8")
    assert encoder.precision == "fp32" and encoder.towers == ("text", "visual")
    cos = _cos(int8.embed_pixels(pixels), encoder.embed_pixels(pixels))
    assert cos.min() >= 0.995 and cos.min() < 1 - 1e-7  # the int8 graph really runs, within the gate
    # an image's int8 vector does not depend on the images beside it in a call
    alone = np.concatenate([int8.embed_pixels(pixels[i : i + 1]) for i in (3, 2, 1, 0)])[::-1]
    assert np.array_equal(int8.embed_pixels(pixels[:4]), alone)


def test_probe_images_are_fixed_and_varied():
    a = onnx_export.probe_pixels(32, onnx_export.CLIP_MEAN, onnx_export.CLIP_STD)
    b = onnx_export.probe_pixels(32, onnx_export.CLIP_MEAN, onnx_export.CLIP_STD)
    assert a.shape == (32, 3, 32, 32) and a.dtype == np.float32 and np.array_equal(a, b)
    flat = a.reshape(32, -1)
    assert len({row.tobytes() for row in flat}) == 32
    assert flat.std(axis=1).min() > 0.05  # no blank image


def test_failed_int8_gate_keeps_fp32_and_says_why(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "INT8_MIN_COSINE", 1.5)
    out = tmp_path / "strict"
    export_towers(tiny, out, context_length=CTX, image_size=SIZE)
    gate = json.loads((out / "export.json").read_text())["int8"]
    assert not gate["kept"] and "min cosine" in gate["reason"] and gate["min_cosine"] > 0.9
    assert not list(out.glob("visual-int8*")) and not list(out.glob(".int8-*"))
    with pytest.raises(ModelUnavailable, match="min cosine"):
        OnnxEncoder(out, precision="int8")
    assert OnnxEncoder(out).embed_pixels(np.zeros((1, 3, SIZE, SIZE), np.float32)).shape == (1, 32)


def test_int8_added_to_an_older_export_without_torch(export_dir, tmp_path):
    d = _copy(export_dir, tmp_path)
    meta = json.loads((d / "export.json").read_text())
    del meta["int8"], meta["towers"]["visual-int8"]
    (d / "export.json").write_text(json.dumps(meta))
    for f in d.glob("visual-int8*"):
        f.unlink()
    assert OnnxEncoder(d).int8_gate is None
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from retrieval.onnx_export import add_int8
        from retrieval.onnx_runtime import OnnxEncoder
        gate = add_int8({str(d)!r})
        enc = OnnxEncoder({str(d)!r}, precision="int8")
        assert gate["kept"] and enc.int8_gate == gate, gate
        assert enc.embed_pixels(np.zeros((2, 3, {SIZE}, {SIZE}), np.float32)).shape == (2, 32)
        bad = [m for m in ("torch", "open_clip") if m in sys.modules]
        assert not bad, bad
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
