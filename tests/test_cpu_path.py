"""The CPU indexing path: a model exported to ONNX once is found again without torch or open_clip."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import retrieval
from cli import cli
from conftest import REPO, TINY_CONFIG, invoke
from retrieval import encoder as encoder_mod
from retrieval import onnx_export
from retrieval.config import BUNDLED_DIR
from retrieval.errors import ModelMismatch, ModelUnavailable

HEAVY = ("torch", "open_clip")


def auto_choice(gate: dict) -> str:
    """What --precision auto must pick for an export with this int8 gate: int8 only if faithful and faster."""
    return "int8" if gate["kept"] and gate["speedup"] >= 1 else "fp32"


def imported_top_modules(stderr: str) -> set[str]:
    """Top-level packages a `python -X importtime` run imported (from its stderr)."""
    names = set()
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", line)
        if match:
            names.add(match.group(1).split(".")[0])
    return names


def index_process(folder: Path, index: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mmsearch index` in a fresh process, recording its imports."""
    proc = subprocess.run([sys.executable, "-X", "importtime", str(REPO / "cli.py"), "index", str(folder),
                           "--index", str(index), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize("model", ["config", "bundled-checkpoint"])
def test_second_new_index_imports_neither_torch_nor_open_clip(tmp_path, photos, model, monkeypatch) -> None:
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))  # no export yet
    if model == "config":
        first_cfg, second_cfg = tmp_path / "a" / "tiny.json", tmp_path / "b" / "copy-of-tiny.json"
        for cfg in (first_cfg, second_cfg):  # identical content at two paths: one export
            cfg.parent.mkdir()
            cfg.write_text(json.dumps(TINY_CONFIG))
        first, second = ["--model", str(first_cfg), "--pretrained", "random"], ["--model", str(second_cfg),
                                                                                 "--pretrained", "random"]
    else:
        first = second = ["--model", "shapes-mini"]
    first_run = index_process(photos, tmp_path / "index1", *first)
    assert HEAVY[0] in imported_top_modules(first_run.stderr)  # the export needed torch, once

    other = tmp_path / "other-photos"
    shutil.copytree(photos, other)
    run = index_process(other, tmp_path / "index2", *second)
    imported = imported_top_modules(run.stderr)
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
    assert "onnxruntime" in imported and "added 6," in run.stderr
    info = subprocess.run([sys.executable, str(REPO / "cli.py"), "info", "--index", str(tmp_path / "index2"),
                           "--json"], capture_output=True, text=True, timeout=120)
    recorded = json.loads(info.stdout)["model"]
    expected = str(second_cfg.resolve()) if model == "config" else "shapes-mini"
    assert recorded["name"] == expected and recorded["dim"] > 0
    if model == "bundled-checkpoint":
        assert recorded["checkpoint_sha256"] == encoder_mod.sha256_file(BUNDLED_DIR / "shapes-mini.pt")


def test_same_export_serves_both_processes(tmp_path, photos, tiny_model) -> None:
    """The vectors of the torch-free process equal those of the process that exported."""
    with retrieval.open_index(tmp_path / "i1", model=tiny_model, pretrained="random", device="cpu") as idx:
        idx.add([photos])
        first = idx.embed_images(sorted(str(p) for p in photos.glob("*.jpg")))
    with retrieval.open_index(tmp_path / "i2", model=tiny_model, pretrained="random", device="cpu") as idx:
        enc = idx.encoder
        assert enc.backend == "onnxruntime" and enc.model is None
        assert (idx.embed_images(sorted(str(p) for p in photos.glob("*.jpg"))) == first).all()


def test_changed_config_content_is_a_new_model(tmp_path, tiny_model) -> None:
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    before = encoder_mod.export_dir(str(cfg), "random")
    assert before == encoder_mod.export_dir(tiny_model, "random")  # same content, other path
    changed = json.loads(json.dumps(TINY_CONFIG))
    changed["embed_dim"] = 16
    cfg.write_text(json.dumps(changed))
    assert encoder_mod.export_dir(str(cfg), "random") != before


def test_checkpoint_hash_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch) -> None:
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"x" * 1000)
    calls = []
    real = encoder_mod.sha256_file
    monkeypatch.setattr(encoder_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    first = encoder_mod.cached_sha256(ckpt)
    assert encoder_mod.cached_sha256(ckpt) == first == real(ckpt) and len(calls) == 1
    ckpt.write_bytes(b"y" * 1000)  # same size, new content and mtime
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    assert encoder_mod.cached_sha256(ckpt) == real(ckpt) != first and len(calls) == 2


def test_forced_int8_refused_when_the_gate_fails_and_auto_falls_back(runner, tmp_path, photos, tiny_model,
                                                                      monkeypatch) -> None:
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "strict-cache"))  # a fresh export, gated strictly
    monkeypatch.setattr(onnx_export, "INT8_MIN_COSINE", 1.5)
    model = ["--model", tiny_model, "--pretrained", "random", "--device", "cpu"]
    refused = runner.invoke(cli, ["index", str(photos), "--index", str(tmp_path / "i"), *model,
                                                    "--precision", "int8"])
    assert refused.exit_code == 1 and "int8" in refused.output and "min cosine" in refused.output, refused.output
    assert invoke(runner, "index", photos, "--index", tmp_path / "i", *model).exit_code == 0
    data = json.loads(invoke(runner, "info", "--index", tmp_path / "i", "--json").output)
    assert data["images"] == 6
    assert data["precision"]["used"] == "fp32" and data["precision"]["requested"] == "auto"
    assert not data["precision"]["int8_gate"]["kept"]
    text = invoke(runner, "info", "--index", tmp_path / "i").output
    assert "precision: fp32" in text and "not kept" in text


def test_precision_is_kept_with_the_index(runner, tmp_path, photos, tiny_model) -> None:
    model = ["--model", tiny_model, "--pretrained", "random", "--device", "cpu"]

    def used() -> str:
        return json.loads(invoke(runner, "info", "--index", tmp_path / "i", "--json").output)["precision"]["used"]

    assert invoke(runner, "index", photos / "sub", "--index", tmp_path / "i", *model, "--precision", "fp32").exit_code == 0
    assert used() == "fp32"
    assert invoke(runner, "index", photos, "--index", tmp_path / "i").exit_code == 0  # no flag: the index's choice
    assert used() == "fp32"
    assert invoke(runner, "index", photos, "--index", tmp_path / "i", "--precision", "auto").exit_code == 0
    gate = json.loads(invoke(runner, "info", "--index", tmp_path / "i", "--json").output)["precision"]["int8_gate"]
    assert gate["kept"] and used() == auto_choice(gate)  # the tiny model passes its int8 gate
    assert invoke(runner, "index", photos, "--index", tmp_path / "i", "--precision", "int8").exit_code == 0
    assert used() == "int8"


def test_an_export_made_before_int8_gets_its_int8_tower_on_first_use(tmp_path, photos, monkeypatch) -> None:
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "m.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    with retrieval.open_index(tmp_path / "i1", model=str(cfg), pretrained="random", device="cpu") as idx:
        folder = idx.encoder.onnx.export_dir
    meta = json.loads((folder / "export.json").read_text())
    del meta["int8"], meta["towers"]["visual-int8"]  # as an export from before int8 towers
    (folder / "export.json").write_text(json.dumps(meta))
    for f in folder.glob("visual-int8*"):
        f.unlink()
    with retrieval.open_index(tmp_path / "i2", model=str(cfg), pretrained="random", device="cpu") as idx:
        idx.add([photos])
        gate = idx.info()["precision"]["int8_gate"]
        assert gate["kept"] and idx.encoder.precision == auto_choice(gate)
    assert json.loads((folder / "export.json").read_text())["int8"]["kept"]
    assert (folder / "visual-int8.onnx").is_file()


def test_int8_needs_the_onnx_path(tmp_path, tiny_model) -> None:
    with retrieval.open_index(tmp_path / "i", model=tiny_model, pretrained="random", device="cpu",
                              backend="torch", precision="int8") as idx:
        with pytest.raises(ModelUnavailable, match="int8 runs on the CPU through the model's ONNX export"):
            idx.encoder
    with retrieval.open_index(tmp_path / "j", model=tiny_model, pretrained="random", device="cpu",
                              backend="torch") as idx:
        assert idx.encoder.precision == "fp32" and idx.encoder.backend == "torch"


@pytest.mark.parametrize("speedup, expected", [(0.6, "fp32"), (1.4, "int8")])
def test_auto_takes_int8_only_where_it_ran_faster(tiny_model, speedup, expected) -> None:
    encoder = encoder_mod.load_encoder(tiny_model, "random", "cpu")
    encoder.onnx.meta["int8"] = dict(encoder.int8_gate, speedup=speedup)
    encoder.set_precision("auto")
    assert encoder.precision == expected
    encoder.set_precision("int8")  # forced: allowed, the gate passed
    assert encoder.precision == "int8"


def test_moved_config_file_keeps_its_index_working_without_torch(tmp_path, photos, monkeypatch) -> None:
    monkeypatch.setenv("MMSEARCH_CACHE", str(tmp_path / "cache"))
    cfg = tmp_path / "models" / "m.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps(TINY_CONFIG))
    with retrieval.open_index(tmp_path / "i", model=str(cfg), pretrained="random", device="cpu") as idx:
        idx.add([photos / "sub"])
        before = idx.search("a red square", k=1)[0].score
    cfg.rename(tmp_path / "moved.json")
    run = index_process(photos, tmp_path / "i")  # the index's own model, config file gone
    assert not imported_top_modules(run.stderr) & set(HEAVY) and "added 5," in run.stderr
    with retrieval.open_index(tmp_path / "i", create=False, device="cpu") as idx:
        assert idx.manifest.name == str(cfg) and idx.info()["images"] == 6
        assert idx.search("a red square", k=6)[0].score >= before - 1e-6
    with pytest.raises(ModelMismatch):  # the moved file is another path: still refused by name
        with retrieval.open_index(tmp_path / "i", model=str(tmp_path / "moved.json"), device="cpu") as idx:
            idx.add([photos])
