"""Export open_clip towers to ONNX (the torch side of the ONNX backend).

``export_towers(model, out_dir, ...)`` takes an already-loaded open_clip model (so torch is loaded
anyway) and writes ONNX files for its text and/or visual tower, the BPE vocabulary and
``export.json`` into ``out_dir`` atomically, after checking the ONNX outputs against torch. The
folder is what ``retrieval.onnx_runtime.OnnxEncoder`` reads (layout and loading: see that module).

torch and onnx (which torch's exporter needs) are imported inside the functions only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ModelUnavailable
from .onnx_runtime import (
    _FILES, _INPUTS, _OUTPUT, FORMAT, INT8_TOWER, META_FILE, OPSET, TOWERS, _load_options, _row_cosine,
    _session_options, _trim_tokens,
)
from .tokenizer import VOCAB_FILENAME, ClipTokenizer, default_vocab_path

__all__ = ["export_towers", "add_int8", "probe_pixels", "MIN_COSINE", "INT8_MIN_COSINE"]

MIN_COSINE = 0.999  # export is refused when any checked row is less similar to the torch output
#: int8 visual tower kept only when every probe image's embedding is at least this close to fp32's
INT8_MIN_COSINE = 0.995
INT8_PROBES = 32
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN / _STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def export_towers(
    model: Any,
    out_dir: Path,
    *,
    context_length: int,
    image_size: int,
    towers: Sequence[str] = ("text", "visual"),
    meta: dict | None = None,
    int8: bool = True,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> None:
    """Export ``model.encode_text`` / ``model.encode_image`` (un-normalized) to ONNX in ``out_dir``.

    ``model``: an open_clip model using the default CLIP BPE tokenizer (vocab size 49408).
    ``context_length``/``image_size``: the model's token context and square input size.
    ``towers``: any non-empty subset of ("text", "visual").
    ``meta``: optional JSON-serializable description of the model (e.g. arch, pretrained tag,
    checkpoint hash), stored as ``export.json["model"]`` so a caller can tell a stale export.
    ``int8``: also write a gated int8 copy of the visual tower (see ``add_int8``), whose probe images
    are normalized with the model's ``mean``/``std``.

    The folder is built next to ``out_dir`` and renamed into place, so ``out_dir`` holds either the
    previous complete export or the new one. Each tower is run by onnxruntime on sample inputs and
    compared with torch before the rename (cosine >= ``MIN_COSINE`` per row, batch 1 and 3).

    The model is used as is when it is float32 on the CPU (its train/eval mode is restored
    afterwards), else a float32 CPU copy is exported (the exported graph always runs in float32).

    Raises ``ModelUnavailable`` when the ``onnx`` package is missing (the torch exporter needs it),
    when the model cannot be exported, or when the exported graph disagrees with torch.
    ViT-B-32 on 2 loaded CPU cores: about 26 s for both towers (trace, optimize, check, fsync);
    text 254 MB, visual 351 MB on disk.
    """
    import importlib.util

    towers = tuple(dict.fromkeys(towers))
    if not towers or any(t not in TOWERS for t in towers):
        raise ValueError(f"towers must be a non-empty subset of {TOWERS}, got {towers!r}")
    if importlib.util.find_spec("onnx") is None:
        raise ModelUnavailable("exporting to ONNX needs the 'onnx' package: pip install onnx")
    import onnx
    import onnxruntime as ort
    import torch

    out_dir = Path(out_dir)
    context_length = int(context_length)
    image_size = int(image_size)
    vocab_src = default_vocab_path()
    tokenizer = ClipTokenizer(vocab_src, context_length)
    vocab_size = _text_vocab_size(model)
    if "text" in towers and vocab_size is not None and vocab_size != tokenizer.vocab_size:
        raise ModelUnavailable(
            f"the text tower has a vocabulary of {vocab_size} tokens, not CLIP's {tokenizer.vocab_size}:"
            " only models using open_clip's default tokenizer can be exported"
        )

    src = _cpu_float_model(model, torch)
    text_tower, visual_tower, exportable_attention = _make_towers()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    was_training = src.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        src.eval()
        # nn.MultiheadAttention's inference fast path (taken under no_grad/inference_mode) is an op
        # the ONNX exporter does not know: trace the plain path.
        torch.backends.mha.set_fastpath_enabled(False)
        info: dict[str, Any] = {}
        embed_dim = None
        gen = torch.Generator().manual_seed(0)
        samples = {
            "text": tokenizer(
                ["a photo of a dog", "", "two cats on a red sofa & a lamp, " * 8]
            ),
            "visual": torch.randn(3, 3, image_size, image_size, generator=gen).numpy(),
        }
        for tower in towers:
            t0 = time.perf_counter()
            dynamic_length = tower == "text" and _text_can_trim(src)
            wrapper = text_tower(src, dynamic_length) if tower == "text" else visual_tower(src)
            # a new wrapper module is in training mode, and the exporter restores the wrapper's
            # mode recursively after tracing: without eval() here the model would be left in
            # training mode (BatchNorm, e.g. ModifiedResNet towers, then computes batch stats)
            wrapper.eval()
            axes = {0: "n", 1: "length"} if dynamic_length else {0: "n"}
            raw_dir = tmp / f"raw-{tower}"  # torch writes per-tensor files here for models > 2 GB
            raw_dir.mkdir()
            raw = raw_dir / f"{tower}.onnx"
            # inference_mode(False): the caller may hold inference mode; tensors made in it
            # cannot be traced. (The model's own weights are fine under no_grad.)
            with torch.inference_mode(False), torch.no_grad(), _quiet_export(), \
                    _swapped_attention(src, exportable_attention, dynamic_length):
                sample = samples[tower][:2]
                if dynamic_length:  # traced shorter than the context, so the cuts are not no-ops
                    sample = _trim_tokens(sample)
                dummy = torch.tensor(sample)
                try:
                    torch.onnx.export(
                        wrapper,
                        (dummy,),
                        str(raw),
                        input_names=[_INPUTS[tower]],
                        output_names=[_OUTPUT],
                        dynamic_axes={_INPUTS[tower]: axes, _OUTPUT: {0: "n"}},
                        opset_version=OPSET,
                        do_constant_folding=True,
                        dynamo=False,
                    )
                except Exception as exc:  # exporter errors are long; keep the first line
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise ModelUnavailable(f"ONNX export of the {tower} tower failed: {first}") from exc
            # Let onnxruntime apply its hardware-independent graph fusions (EXTENDED level) now and
            # save the result as graph + one external weights file: a later session then maps the
            # weights instead of parsing them out of the protobuf and skips the optimizer
            # (ViT-B-32 text session start: 0.95 s inline/optimizing -> ~0.05 s).
            final = tmp / _FILES[tower]
            _save_optimized(ort, raw, final, f"the exported {tower} tower")
            shutil.rmtree(raw_dir)
            export_s = time.perf_counter() - t0

            # check against torch on batch 1 and batch 3 (and, for text, a trimmed length), with
            # the saved graph loaded as OnnxEncoder loads it
            sess = ort.InferenceSession(
                str(final), _load_options(ort, tower, optimized_by=ort.__version__, threads=None, prepack=True),
                providers=["CPUExecutionProvider"],
            )
            worst = 1.0
            batches = [samples[tower][:1], samples[tower]]
            if tower == "text" and dynamic_length:
                batches.append(_trim_tokens(samples["text"][:2]))
            for batch in batches:
                with torch.no_grad():
                    if tower == "text":
                        full = np.zeros((batch.shape[0], context_length), np.int64)
                        full[:, : batch.shape[1]] = batch
                        ref = src.encode_text(torch.from_numpy(full)).float().numpy()
                    else:
                        ref = src.encode_image(torch.from_numpy(batch)).float().numpy()
                got = sess.run(None, {_INPUTS[tower]: batch})[0]
                if got.shape != ref.shape:
                    raise ModelUnavailable(
                        f"ONNX {tower} tower returned shape {got.shape}, torch {ref.shape}"
                    )
                worst = min(worst, float(_row_cosine(got, ref).min()))
                embed_dim = int(ref.shape[1]) if embed_dim is None else embed_dim
                if ref.shape[1] != embed_dim:
                    raise ModelUnavailable("text and visual embeddings differ in size for this model")
            del sess
            if not worst >= MIN_COSINE:
                raise ModelUnavailable(
                    f"ONNX {tower} tower disagrees with torch (min cosine {worst:.6f} < {MIN_COSINE})"
                )
            info[tower] = {
                "file": final.name,
                "data": final.name + ".data",
                "bytes": {final.name: final.stat().st_size,
                          final.name + ".data": (tmp / (final.name + ".data")).stat().st_size},
                "input": _INPUTS[tower],
                "output": _OUTPUT,
                "min_cosine_vs_torch": worst,
                "optimized_by": {"onnxruntime": ort.__version__, "level": "extended"},
                "export_seconds": round(export_s, 2),
            }
            if tower == "text":
                info[tower]["dynamic_length"] = dynamic_length

        shutil.copyfile(vocab_src, tmp / VOCAB_FILENAME)
        int8_gate = _quantize_visual(tmp, info, image_size, mean, std) if int8 and "visual" in info else None
        metadata = {
            "format": FORMAT,
            "context_length": context_length,
            "image_size": image_size,
            "embed_dim": embed_dim,
            "opset": OPSET,
            "towers": info,
            "tokenizer": {
                "file": VOCAB_FILENAME,
                "type": "open_clip.SimpleTokenizer",
                "clean": "lower",
                "vocab_size": tokenizer.vocab_size,
            },
            "versions": _versions(torch, onnx, ort),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": meta or {},
        }
        if int8_gate is not None:
            metadata["int8"] = int8_gate
        (tmp / META_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        _fix_modes(tmp)
        _fsync_tree(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        src.train(was_training)


def _save_optimized(ort, raw: Path, final: Path, what: str) -> None:
    """Save ``raw`` as onnxruntime's EXTENDED-optimized graph ``final`` + one external weights file.

    A later session then maps the weights instead of parsing them out of the protobuf and can skip
    the hardware-independent fusions (ViT-B-32 text session start: 0.95 s inline/optimizing -> ~0.05 s).
    """
    opts = _session_options(ort, level="extended", threads=None, prepack=True)
    opts.optimized_model_filepath = str(final)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", final.name + ".data")
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(raw), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelUnavailable(f"onnxruntime cannot load {what}: {exc}") from exc


def probe_pixels(size: int, mean: Sequence[float], std: Sequence[float], n: int = INT8_PROBES) -> np.ndarray:
    """``n`` fixed images [n, 3, size, size], normalized: the int8 gate's test set.

    Deterministic, and varied the way quantization errors show: flat shapes on plain grounds (like
    the bundled shapes-mini's data), smooth gradients, fine noise, and the three mixed.
    """
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(20261129)
    out = np.empty((n, size, size, 3), np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    for i in range(n):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip(np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None], 0, 1)[..., None]
        kind = i % 4
        ground = a + (b - a) * t if kind in (1, 3) else np.broadcast_to(a, (size, size, 3))
        img = Image.fromarray(np.clip(ground, 0, 255).astype(np.uint8))
        if kind in (0, 3):
            draw = ImageDraw.Draw(img)
            for _ in range(int(rng.integers(1, 4))):
                x, y = rng.uniform(0, size, 2)
                r = rng.uniform(size / 8, size / 2.5)
                color = tuple(int(c) for c in rng.integers(0, 256, 3))
                shape = int(rng.integers(0, 3))
                if shape == 0:
                    draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
                elif shape == 1:
                    draw.rectangle((x - r, y - r, x + r, y + r), fill=color)
                else:
                    draw.regular_polygon((x, y, r), int(rng.integers(3, 7)), fill=color)
            img = img.filter(ImageFilter.GaussianBlur(0.5))
        arr = np.asarray(img, np.float32)
        if kind in (2, 3):
            arr = arr + rng.normal(0, 40 if kind == 2 else 12, arr.shape)
        out[i] = np.clip(arr, 0, 255)
    x = (out / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def add_int8(folder: Path, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> dict:
    """Give an export made without one a gated int8 visual tower (no torch needed); returns the gate.

    The new files are renamed into ``folder`` under names nothing reads yet, then ``export.json`` is
    replaced atomically, so a process reading the folder meanwhile sees the old or the new export.
    """
    meta_path = Path(folder) / META_FILE
    meta = json.loads(meta_path.read_text())
    gate = _quantize_visual(Path(folder), meta["towers"], int(meta["image_size"]), mean, std)
    meta["int8"] = gate
    tmp = meta_path.with_name(f".{META_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.chmod(tmp, 0o644)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, meta_path)
    return gate


def _quantize_visual(folder: Path, towers: dict, image_size: int, mean: Sequence[float],
                     std: Sequence[float]) -> dict:
    """Quantize the visual tower in ``folder`` (onnxruntime dynamic int8: QInt8 weights of MatMul/Gemm)
    and gate it on ``probe_pixels``: kept (files in ``folder``, ``towers[INT8_TOWER]`` added) only
    when every probe's cosine to the fp32 tower is >= ``INT8_MIN_COSINE``. Returns the gate record,
    with ``speedup`` (fp32 time / int8 time on this machine: below 1, "auto" keeps fp32).
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    gate: dict[str, Any] = {"threshold": INT8_MIN_COSINE, "probes": INT8_PROBES, "kept": False}
    work = Path(tempfile.mkdtemp(prefix=".int8-", dir=folder))
    try:
        raw = work / "quantized.onnx"
        try:
            # the saved graph holds onnxruntime contrib ops, whose output types the quantizer cannot
            # infer: treat unknown tensors as float (shapes-mini's conv tower needs this)
            logging.disable(logging.WARNING)  # the quantizer's advice goes to the root logger
            quantize_dynamic(folder / towers["visual"]["file"], raw, weight_type=QuantType.QInt8,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
            built = work / _FILES[INT8_TOWER]
            _save_optimized(ort, raw, built, "the int8 visual tower")
        except Exception as exc:  # quantizer errors: keep fp32, say why
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            gate["reason"] = f"quantization failed: {first}"
            return gate
        finally:
            logging.disable(logging.NOTSET)
        pixels = probe_pixels(image_size, mean, std)
        sessions = [ort.InferenceSession(str(path), _load_options(ort, "visual", optimized_by=None, threads=None,
                                                                  prepack=True), providers=["CPUExecutionProvider"])
                    for path in (folder / towers["visual"]["file"], built)]

        def run(which: int, images: np.ndarray) -> np.ndarray:
            chunk = len(images) if which == 0 else 1  # int8 one image per call, as OnnxEncoder runs it
            return np.concatenate([sessions[which].run([_OUTPUT], {_INPUTS["visual"]: images[i : i + chunk]})[0]
                                   for i in range(0, len(images), chunk)])

        worst = float(_row_cosine(run(0, pixels), run(1, pixels)).min())
        # Speed, best of 2 alternating passes over 16 probes: int8 one image per call pays a per-call
        # cost that can outweigh its faster kernels on a small model (shapes-mini: 0.7x fp32).
        best = [float("inf"), float("inf")]
        for _ in range(2):
            for which in (0, 1):
                start = time.perf_counter()
                run(which, pixels[:16])
                best[which] = min(best[which], time.perf_counter() - start)
        del sessions
        gate["min_cosine"] = round(worst, 6)
        gate["speedup"] = round(best[0] / max(best[1], 1e-9), 2)
        gate["seconds"] = round(time.perf_counter() - t0, 2)
        if not worst >= INT8_MIN_COSINE:
            gate["reason"] = (f"min cosine {worst:.4f} to fp32 on {INT8_PROBES} probe images is below "
                              f"{INT8_MIN_COSINE}")
            return gate
        names = [built.name, built.name + ".data"]
        for name in names:
            os.chmod(work / name, 0o644)
            with open(work / name, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(work / name, folder / name)
        gate["kept"] = True
        towers[INT8_TOWER] = {
            "file": built.name,
            "data": built.name + ".data",
            "bytes": {name: (folder / name).stat().st_size for name in names},
            "input": _INPUTS["visual"],
            "output": _OUTPUT,
            "min_cosine_vs_fp32": gate["min_cosine"],
            "optimized_by": {"onnxruntime": ort.__version__, "level": "extended"},
        }
        return gate
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _text_vocab_size(model) -> int | None:
    emb = getattr(model, "token_embedding", None)
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    return getattr(model, "vocab_size", None)


def _cpu_float_model(model, torch):
    """The model itself when it is a float32 CPU model, else a float32 CPU copy (for export only)."""
    params = list(model.parameters())
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return model
    import copy

    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32)


def _text_can_trim(model) -> bool:
    """True when the text tower can be exported for inputs shorter than its context length.

    Needs open_clip's CLIP text path (token embedding, causal mask, EOT/argmax pooling: positions
    after the last EOT cannot change the output) built from batch-first ``nn.MultiheadAttention``
    self-attention blocks, which ``_ExportableAttention`` stands in for while tracing.
    """
    import torch

    if not (
        hasattr(model, "token_embedding")
        and hasattr(model, "positional_embedding")
        and hasattr(model, "ln_final")
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) == "argmax"
        and getattr(getattr(model, "transformer", None), "batch_first", False)
        and hasattr(model.transformer, "resblocks")
    ):
        return False
    for block in model.transformer.resblocks:
        attn = getattr(block, "attn", None)
        if not (
            isinstance(attn, torch.nn.MultiheadAttention)
            and attn.batch_first
            and attn._qkv_same_embed_dim
            and attn.in_proj_weight is not None
            and attn.bias_k is None
            and not attn.add_zero_attn
            and not hasattr(block, "ln_1_kv")
        ):
            return False
    return True


def _make_towers():
    import torch
    import torch.nn.functional as F

    class ExportableAttention(torch.nn.Module):
        """nn.MultiheadAttention self-attention (batch first, packed projections) in plain ops.

        torch's own MHA code bakes the traced sequence length into its reshapes; this one keeps
        it symbolic. Same parameters, same math: q scaled by head_dim**-0.5, additive float mask.
        """

        def __init__(self, mha):
            super().__init__()
            self.mha = mha
            self.heads = mha.num_heads
            self.head_dim = mha.embed_dim // mha.num_heads

        def forward(self, query, key, value, need_weights=False, attn_mask=None, **_):
            mha = self.mha
            n = query.shape[0]
            qkv = F.linear(query, mha.in_proj_weight, mha.in_proj_bias)
            qkv = qkv.reshape(n, -1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # [n, heads, L, head_dim]
            scores = (q * float(self.head_dim) ** -0.5) @ k.transpose(-2, -1)
            if attn_mask is not None:
                if attn_mask.dtype == torch.bool:
                    scores = scores.masked_fill(attn_mask, float("-inf"))
                else:
                    scores = scores + attn_mask
            out = scores.softmax(dim=-1) @ v
            out = out.transpose(1, 2).reshape(n, -1, mha.embed_dim)
            return F.linear(out, mha.out_proj.weight, mha.out_proj.bias), None

    class TextTower(torch.nn.Module):
        """encode_text; with ``trim``, also for inputs shorter than the context length."""

        def __init__(self, model, trim: bool):
            super().__init__()
            self.model = model
            self.trim = trim

        def forward(self, text):
            m = self.model
            if not self.trim:
                return m.encode_text(text)
            # open_clip CLIP.encode_text, with the positional embedding and the causal mask cut to
            # the input length; export_towers checks the result against encode_text itself.
            from open_clip.transformer import text_global_pool

            n_ctx = text.shape[1]
            cast_dtype = m.transformer.get_cast_dtype()
            x = m.token_embedding(text).to(cast_dtype)
            x = x + m.positional_embedding[:n_ctx].to(cast_dtype)
            x = m.transformer(x, attn_mask=m.attn_mask[:n_ctx, :n_ctx])
            x = m.ln_final(x)
            x = text_global_pool(x, text, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
            if m.text_projection is not None:
                if isinstance(m.text_projection, torch.nn.Linear):
                    x = m.text_projection(x)
                else:
                    x = x @ m.text_projection
            return x

    class VisualTower(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixels):
            return self.model.encode_image(pixels)

    return TextTower, VisualTower, ExportableAttention


class _swapped_attention:
    """While tracing the text tower, its blocks' ``attn`` modules are ExportableAttention wrappers
    around the same parameters; the originals are put back on exit (the model is not copied)."""

    def __init__(self, model, wrapper_cls, active: bool):
        self.blocks = list(model.transformer.resblocks) if active else []
        self.wrapper_cls = wrapper_cls
        self.saved: list = []

    def __enter__(self):
        for block in self.blocks:
            self.saved.append(block.attn)
            block.attn = self.wrapper_cls(block.attn)
        return self

    def __exit__(self, *exc):
        for block, attn in zip(self.blocks, self.saved):
            block.attn = attn
        self.saved.clear()
        return False


class _quiet_export:
    """Silence the exporter's deprecation/tracer warnings (not its errors)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _versions(torch, onnx, ort) -> dict[str, str]:
    versions = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}
    try:
        from importlib.metadata import version

        versions["open_clip_torch"] = version("open_clip_torch")
    except Exception:  # pragma: no cover - metadata missing in odd installs
        pass
    return versions


def _fix_modes(folder: Path) -> None:
    """mkdtemp makes a 0700 folder and onnx writes 0600 data files: make the export world-readable."""
    os.chmod(folder, 0o755)
    for path in folder.iterdir():
        os.chmod(path, 0o644)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first, then removed."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(out_dir.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
