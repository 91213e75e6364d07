"""mmsearch: the command-line front end. Each command parses options, calls the library, formats.

Data goes to stdout; progress, warnings and errors to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import retrieval
from retrieval.search import TARGETS


def _index_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--index", "index_dir", type=click.Path(file_okay=False, path_type=Path),
                        help="Index directory (default: $MMSEARCH_INDEX, else ~/.local/share/mmsearch).")(func)


def _device_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                        help="Where the model runs.")(func)


def _wait_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--wait", type=click.FloatRange(0), default=0, show_default=True, metavar="SECONDS",
                        help="If another `mmsearch index` is writing this index, wait this long for it.")(func)


def _reports_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one-line messages with a non-zero exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except retrieval.MMSearchError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted: everything committed so far is kept", err=True)
            sys.exit(130)

    return wrapper


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mmsearch: %(message)s"))
    log = logging.getLogger("mmsearch")
    log.handlers[:] = [handler]
    log.setLevel(logging.ERROR if quiet else logging.WARNING)
    log.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmsearch")
def cli() -> None:
    """Search images by meaning and texts by image, with CLIP, offline."""


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@_index_option
@click.option("--model", envvar="MMSEARCH_MODEL", help="open_clip architecture (ViT-B-32) or bundled model (shapes-mini).")
@click.option("--pretrained", envvar="MMSEARCH_PRETRAINED",
              help="open_clip tag (laion2b_s34b_b79k), a local checkpoint file, or 'random'.")
@_device_option
@click.option("--precision", type=click.Choice(["auto", "fp32", "int8"]),
              help="Image tower precision: auto = int8 on CPU where the model passes its int8 check (else fp32), "
                   "fp16 on CUDA. Default: the index's last choice, else auto.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(0, 64), default=None, help="Image decode processes (default: 0 = one decode thread on 2 cores or fewer, else cores - 1).")
@click.option("--text-field", help="Field holding the text in .jsonl/.csv records (default: text, then caption).")
@click.option("--failures", "failures_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every skipped file and its reason to this file (tab-separated).")
@_wait_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or warnings.")
@_reports_errors
def index(paths: tuple[Path, ...], index_dir: Path | None, model: str | None, pretrained: str | None, device: str,
          precision: str | None, batch_size: int, workers: int | None, text_field: str | None, failures_file: Path | None, wait: float,
          quiet: bool) -> None:
    """Index image folders and text corpora (.txt, .jsonl, .csv), incrementally.

    With no PATHS, re-scans every folder indexed before.
    """
    from tqdm import tqdm

    _setup_logging(quiet)
    bar = tqdm(total=0, unit="file", file=sys.stderr, disable=quiet or not sys.stderr.isatty(), desc="embedding")
    with retrieval.open_index(index_dir, model=model, pretrained=pretrained, device=device, wait=wait,
                              precision=precision) as idx:
        report = idx.add(list(paths), text_field=text_field, batch_size=batch_size, workers=workers,
                         progress=bar.update, on_total=lambda n: bar.reset(total=n))
    bar.close()
    if failures_file:
        failures_file.write_text("".join(f"{path}\t{reason}\n" for path, reason in report.failures), encoding="utf-8")
    if report.failures and not quiet:
        shown = report.failures[:5]
        for path, reason in shown:
            click.echo(f"skipped {path}: {reason}", err=True)
        if len(report.failures) > len(shown):
            click.echo(f"... and {len(report.failures) - len(shown)} more (see `mmsearch info --failures`)", err=True)
    click.echo(report.summary(), err=True)


@cli.command()
@click.argument("text", required=False)
@click.option("--image", "image", type=click.Path(dir_okay=False, path_type=Path), help="Query by this image.")
@_index_option
@click.option("--target", type=click.Choice(sorted(TARGETS)), help="What to return (default: the other modality).")
@click.option("-k", "k", type=click.IntRange(1, 10000), default=10, show_default=True, help="Number of results.")
@click.option("--min-score", type=float, help="Drop results below this cosine similarity.")
@click.option("--under", type=click.Path(path_type=Path), help="Only items whose file lies in this folder.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@_device_option
@_reports_errors
def query(text: str | None, image: Path | None, index_dir: Path | None, target: str | None, k: int,
          min_score: float | None, under: Path | None, as_json: bool, device: str) -> None:
    """Find images for TEXT, or texts (--target images|all) for --image."""
    _setup_logging(False)
    if (text is None) == (image is None):
        raise click.UsageError("give either a TEXT query or --image PATH")
    with retrieval.open_index(index_dir, device=device, create=False) as idx:
        results = idx.search(image if image is not None else text, k=k, target=target, min_score=min_score, under=under)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=2))
        return
    if not results:
        click.echo("no results", err=True)
    for r in results:
        shown = r.path if r.kind == "image" else f"{r.text}  [{Path(r.path).name}:{r.line}]"
        click.echo(f"{r.rank:>3}  {r.score:.4f}  {shown}")


@cli.command()
@_index_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--failures", "show_failures", is_flag=True, help="List skipped files and why.")
@_reports_errors
def info(index_dir: Path | None, as_json: bool, show_failures: bool) -> None:
    """Show the index: location, model, counts, FAISS layout, size on disk."""
    _setup_logging(False)
    with retrieval.open_index(index_dir, create=False) as idx:
        data = idx.info()
        failures = idx.failures() if show_failures else []
    if show_failures:
        data["failure_list"] = [{"path": p, "reason": r} for p, r in failures]
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))
        return
    model = data["model"]
    click.echo(f"index:    {data['index']}")
    click.echo(f"model:    {'-' if model is None else model['name'] + ' / ' + str(model['pretrained']) + ', dim ' + str(model['dim'])}")
    click.echo(f"images:   {data['images']}")
    click.echo(f"texts:    {data['texts']}")
    click.echo(f"files:    {data['files']}")
    click.echo(f"skipped:  {data['failures']}")
    click.echo(f"layout:   {', '.join(f'{k}: {v}' for k, v in data['layouts'].items()) or '-'}")
    click.echo(f"precision: {_describe_precision(data['precision'])}")
    click.echo(f"size:     {data['size_bytes'] / 1e6:.1f} MB")
    for p, r in failures:
        click.echo(f"skipped {p}: {r}")


def _describe_precision(setting: dict[str, Any] | None) -> str:
    """'int8 (asked: auto; int8 check: min cosine 0.999818 vs 0.995 on 32 probe images, kept, 1.3x fp32's speed)'."""
    if not setting:
        return "-"
    text = f"{setting.get('used')} (asked: {setting.get('requested')}"
    gate = setting.get("int8_gate")
    if gate and "min_cosine" in gate:
        outcome = "kept" if gate.get("kept") else "not kept"
        text += (f"; int8 check: min cosine {gate['min_cosine']:.6f} vs {gate['threshold']} on {gate['probes']} "
                 f"probe images, {outcome}")
        if gate.get("kept") and "speedup" in gate:
            text += f", {gate['speedup']}x fp32's speed"
    elif gate:
        text += f"; int8 not kept: {gate.get('reason')}"
    return text + ")"


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@_index_option
@_wait_option
@_reports_errors
def remove(paths: tuple[Path, ...], index_dir: Path | None, wait: float) -> None:
    """Take files or folders out of the index (they need not exist any more); they are not re-scanned."""
    _setup_logging(False)
    with retrieval.open_index(index_dir, create=False, wait=wait) as idx:
        removal = idx.remove(list(paths))
    click.echo(removal.summary(), err=True)


@cli.command()
@_index_option
@click.option("--faiss", "layout", help="FAISS index factory string to force (e.g. Flat, HNSW32); default: automatic.")
@_wait_option
@_reports_errors
def reindex(index_dir: Path | None, layout: str | None, wait: float) -> None:
    """Rebuild the vector caches from the database."""
    _setup_logging(False)
    with retrieval.open_index(index_dir, create=False, wait=wait) as idx:
        layouts = idx.reindex(layout)
    click.echo(", ".join(f"{kind}: {name}" for kind, name in layouts.items()), err=True)


def main() -> None:
    """Console-script entry point.

    Ends with `os._exit` once output is flushed: every command has closed its index by then, and
    tearing down the interpreter (onnxruntime, FAISS, SQLAlchemy) would add ~0.4 s to each query.
    """
    try:
        code = cli.main(standalone_mode=False)
        code = code if isinstance(code, int) else 0
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        code = 1
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
