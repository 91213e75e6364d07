"""mmsearch: the command-line front end. Each command parses options, calls the library, formats.

Data goes to stdout; progress, warnings and errors to stderr.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

import retrieval
from retrieval.calibrate import AUTO_RELEVANCE
from retrieval.config import DEFAULT_MODEL, DEFAULT_PRETRAINED, kind_of
from retrieval.dupes import DEFAULT_THRESHOLD
from retrieval.search import TARGETS

HELP = f"""Search images by meaning and texts by image, with CLIP, offline.

\b
Default model: {DEFAULT_MODEL} with {DEFAULT_PRETRAINED} weights (see `index --help`).
Environment variables:
  MMSEARCH_INDEX       index directory (default: $XDG_DATA_HOME/mmsearch, ~/.local/share/mmsearch)
  MMSEARCH_DB          the index in a database instead, as --db (postgresql+psycopg://USER@HOST/DB)
  MMSEARCH_VECTORS     vectors in Milvus, as --vectors (milvus://HOST:PORT or a milvus-lite PATH.db)
  MMSEARCH_MODEL       model of a new index, as --model
  MMSEARCH_PRETRAINED  its weights, as --pretrained
  MMSEARCH_CACHE       exported models (default: $XDG_CACHE_HOME/mmsearch, ~/.cache/mmsearch)
  MMSEARCH_BACKEND     auto (onnxruntime on a CPU, torch on CUDA), torch or onnx
  MMSEARCH_OFFLINE     if set, never try to reach the model hub
  MMSEARCH_GPU_DECODE  auto (JPEGs decoded on the GPU when the model runs on CUDA), on or off
  MMSEARCH_TOKEN       the secret of `serve --token`
  MMSEARCH_RAY         `index --ray`: embed images on Ray (local, auto or ray://HOST:PORT)
  MMSEARCH_OCR         auto (read the text in images where the ocr extra is installed), on or off
  MMSEARCH_PRUNE_MAX_SHARE, MMSEARCH_PRUNE_MAX_FILES
                       a re-scan keeps a folder's missing files when more than this
                       share (0.2) and this many (10) are gone, unless --prune
"""

#: C0/C1 control characters and lone surrogates (undecodable bytes of a file name): escaped in tables.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _shown(text: str) -> str:
    """`text` for a line of table output: a newline or escape sequence in a file name is shown escaped."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)


def _index_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """--index, or --db (metadata in a database) and --vectors (another vector store): where the index is."""
    func = click.option("--vectors", metavar="URI",
                        help="Keep the searchable vectors in Milvus: milvus://HOST:PORT, http(s)://HOST:PORT, or an "
                             "embedded milvus-lite PATH.db (default: $MMSEARCH_VECTORS, else FAISS files).")(func)
    func = click.option("--db", metavar="URL",
                        help="Keep the index in this database instead of a directory: an SQLAlchemy URL, "
                             "postgresql+psycopg://USER@HOST/DB or sqlite:///PATH (default: $MMSEARCH_DB).")(func)
    return click.option("--index", "index_dir", type=click.Path(file_okay=False, path_type=Path),
                        help="Index directory (default: $MMSEARCH_INDEX, else ~/.local/share/mmsearch).")(func)


def _device_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                        help="Where the model runs.")(func)


def _wait_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--wait", type=click.FloatRange(0), default=0, show_default=True, metavar="SECONDS",
                        help="If another `mmsearch index` is writing this index, wait this long for it.")(func)


class MemorySize(click.ParamType):
    """A byte count like 300MB, 2GB, 1.5G (K/M/G = 1024-based as in autofaiss; KB/MB/GB
    1000-based); 0 clears a stored budget."""

    name = "SIZE"
    _UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match and self._UNITS.get(match[2].lower())
        if not unit:
            self.fail(f"{value!r} is not a memory size like 300MB or 2GB", param, ctx)
        return int(float(match[1]) * unit)


def _max_memory_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--max-memory", type=MemorySize(), metavar="SIZE",
                        help="Memory budget of the vector index (e.g. 300MB); the automatic layout picks one "
                             "that fits (compressed, re-ranked from the database) and reports its recall. "
                             "Kept by later runs; 0 clears it.")(func)


def _model_choice_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--model", metavar="NAME",
                        help="Which of the index's models to use (one added with `index --add-model`): its name as "
                             "given to --model, or its key from `info`. Default: the index's first model.")(func)


def _quiet_option(func: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--quiet", "-q", is_flag=True, help="No progress bar, warnings or hints (errors still show).")(func)


def _reports_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one-line messages with a non-zero exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except retrieval.MMSearchError as exc:
            raise click.ClickException(_shown(str(exc))) from None
        except KeyboardInterrupt:
            click.echo("interrupted: everything committed so far is kept", err=True)
            sys.exit(130)

    return wrapper


class _EscapingFormatter(logging.Formatter):
    """Library warnings name files: their control characters are shown escaped, as in tables."""

    def format(self, record: logging.LogRecord) -> str:
        return _shown(super().format(record))


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EscapingFormatter("mmsearch: %(message)s"))
    log = logging.getLogger("mmsearch")
    log.handlers[:] = [handler]
    log.setLevel(logging.ERROR if quiet else logging.WARNING)
    log.propagate = False


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmsearch")
def cli() -> None:
    """The mmsearch command group (its help is HELP)."""


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@_index_option
@click.option("--model", envvar="MMSEARCH_MODEL",
              help=f"Model of a new index: an open_clip architecture, a bundled model (shapes-mini) or an open_clip "
                   f"model config (.json) [default: {DEFAULT_MODEL}].")
@click.option("--pretrained", envvar="MMSEARCH_PRETRAINED",
              help=f"open_clip tag, a local checkpoint file, or 'random' (random weights, for tests). Default: the "
                   f"architecture's usual weights ({DEFAULT_MODEL}: {DEFAULT_PRETRAINED}); other architectures and "
                   f".json configs need it.")
@click.option("--add-model", is_flag=True,
              help="Add --model (and --pretrained) to this existing index as another model: every item gets a vector "
                   "of it too (the first model's are kept and stay the default); from then on new files are embedded "
                   "with every model. Without this flag a different --model is refused.")
@_device_option
@click.option("--precision", type=click.Choice(["auto", "fp32", "int8"]),
              help="Image tower precision: auto = int8 on CPU where the model passes its int8 check (else fp32), "
                   "fp16 on CUDA. Default: the index's last choice, else auto.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Images embedded (and committed) together.")
@click.option("--workers", type=click.IntRange(0, 64), default=None, help="Image decode processes (default: 0 = one decode thread on 2 cores or fewer, else cores - 1).")
@click.option("--text-field", help="Field holding the text in .jsonl/.json/.csv records (default: text, then caption); "
              "kept for these PATHS by later runs.")
@click.option("--exclude", "exclude", multiple=True, metavar="PATTERN",
              help="Leave out paths below a folder matching this glob (fnmatch, ** allowed; repeatable); "
                   "kept for these PATHS by later runs, replaced by a new --exclude, cleared by --exclude ''.")
@click.option("--include-hidden/--skip-hidden", default=None,
              help="Index hidden files and folders (.name, macOS ._name); skipped by default; kept for these PATHS.")
@click.option("--prune", is_flag=True,
              help="Remove every file gone from disk, even when more than 20 % of a folder's files (and more "
                   "than 10) are gone at once, which is otherwise kept as a likely unmounted drive.")
@click.option("--failures", "failures_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every skipped file and its reason to this file (tab-separated).")
@click.option("--ray", "ray_address", envvar="MMSEARCH_RAY", metavar="ADDRESS",
              help="Decode and embed the images on Ray Data: local (start Ray here), auto (the cluster running "
                   "on this machine) or ray://HOST:PORT; needs pip install 'mmsearch[cluster]'.")
@click.option("--ocr/--no-ocr", default=None,
              help="Read the text in images for words search (needs the ocr extra and Tesseract; slow: 0.1-1 s "
                   "an image, more than embedding it). Default: $MMSEARCH_OCR (auto, on, off), auto = where installed. "
                   "--ocr on an index also reads the images indexed before.")
@_max_memory_option
@_wait_option
@_quiet_option
@_reports_errors
def index(paths: tuple[Path, ...], index_dir: Path | None, model: str | None, pretrained: str | None, add_model: bool,
          device: str, precision: str | None, batch_size: int, workers: int | None, text_field: str | None, exclude: tuple[str, ...],
          include_hidden: bool | None, prune: bool, failures_file: Path | None, ray_address: str | None,
          ocr: bool | None, max_memory: int | None, wait: float, quiet: bool, db: str | None, vectors: str | None) -> None:
    """Index image folders and text corpora (.txt, .jsonl, .json, .csv), incrementally.

    With no PATHS, re-scans every folder indexed before, each with its stored options; with
    --add-model and no PATHS, only adds the model.
    """
    from tqdm import tqdm

    _setup_logging(quiet)
    if add_model and not model:
        raise click.UsageError("--add-model needs --model (the model to add)")
    bar = tqdm(total=0, unit="file", file=sys.stderr, disable=quiet or not sys.stderr.isatty(), desc="embedding")
    # A re-scan (no PATHS) needs an index to exist already: it creates none; nor does --add-model.
    with retrieval.open_index(index_dir, model=None if add_model else model, pretrained=None if add_model else pretrained,
                              device=device, wait=wait, precision=precision, create=bool(paths) and not add_model,
                              db=db, vectors=vectors) as idx:
        if add_model:
            report = idx.add_model(model, pretrained, workers=workers)
            for key, n in report.filled.items():
                click.echo(f"model {key}: {n} items embedded", err=True)
            if not report.filled:
                click.echo(f"{model} is a model of this index already, with a vector for every item", err=True)
        if paths or not add_model:
            report = idx.add(list(paths), text_field=text_field, exclude=list(exclude) if exclude else None,
                             include_hidden=include_hidden, prune=prune, batch_size=batch_size, workers=workers, ocr=ocr,
                             progress=bar.update, on_total=lambda n: bar.reset(total=n), max_memory=max_memory,
                             ray=ray_address)
    bar.close()
    if add_model and not paths:
        return
    if failures_file:
        failures_file.write_text("".join(f"{path}\t{reason}\n" for path, reason in report.failures), encoding="utf-8")
    if report.failures and not quiet:
        shown = report.failures[:5]
        for path, reason in shown:
            click.echo(f"skipped {_shown(path)}: {_shown(reason)}", err=True)
        if len(report.failures) > len(shown):
            click.echo(f"... and {len(report.failures) - len(shown)} more (see `mmsearch info --failures`)", err=True)
    click.echo(report.summary(), err=True)
    if report.nothing_indexed:
        raise click.ClickException(f"nothing indexed from {', '.join(report.empty_paths)}")


class _MinScore(click.ParamType):
    """A cosine similarity between -1 and 1, or 'auto'."""

    name = "FLOAT|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | str:
        if isinstance(value, float) or value == "auto":
            return value
        try:
            return float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number nor 'auto'", param, ctx)


QUERY_HELP = """Find images for TEXT, or texts for --image; or combine texts and images.

\b
A combined query is one vector (every e(.) a unit embedding, weights default to 1):
  q = normalize(mean(e(images)) + w*e(TEXT) + sum w*e(--add) - sum w*e(--subtract))
A text's weight is a trailing ::WEIGHT ("sunset::0.5"), read only when a number follows.

\b
Examples:
  mmsearch query "a beach" --add "sunset" --subtract "people::0.5"
  mmsearch query "a dog" --not "grass"          # drop dogs that look more like grass
  mmsearch query --image x.jpg "in winter"       # this picture, but in winter (targets images)
  mmsearch query --image a.jpg --image b.jpg     # several images, averaged
  mmsearch query "a blue star" --min-score auto --json   # only clear matches; JSON has `relevance`
  mmsearch query "a red circle" --within 0.05 --collapse
  mmsearch query "a beach" --after 2024-06-01 --before 2024-09-01 --camera pixel --min-size 800x600
  mmsearch query "germany" --sort date           # words and meaning, oldest first
  mmsearch query "invoice" --words-only --json   # file/folder names, EXIF, text read by OCR
  mmsearch query "a dog" --model ViT-L-14        # with another model of the index (index --add-model)

\b
Words as well as meaning: a text query also matches the words of each item (file and folder
names, EXIF camera, capture year and month, text read from images by OCR, a text's own words).
Where some match, the two rankings are fused by reciprocal rank fusion,
  rrf(item) = sum over rankings of 1 / (60 + rank),
else it is the meaning ranking alone. --semantic-only or --words-only picks one. Every
result's score is its cosine; --json gives each result's `ranks` (and `words_score`, `fused`).
"""


@cli.command(help=QUERY_HELP)
@click.argument("text", required=False)
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Query by this image (repeat to average several; with TEXT, combined).")
@click.option("--add", multiple=True, metavar="TEXT[::W]", help="Add this text's embedding (repeatable).")
@click.option("--subtract", multiple=True, metavar="TEXT[::W]", help="Subtract this text's embedding (repeatable).")
@click.option("--not", "exclude", multiple=True, metavar="TEXT",
              help="Drop results that match TEXT better than the query (repeatable); k are still returned when k pass.")
@_index_option
@click.option("--target", type=click.Choice(sorted(TARGETS)),
              help="What to return (default: images for a query with text, else texts).")
@click.option("-k", "k", type=click.IntRange(1, 10000), default=10, show_default=True, help="Number of results.")
@click.option("--min-score", type=_MinScore(),
              help="Drop results below this cosine similarity (-1 to 1), or 'auto': keep results whose "
                   f"relevance (standard deviations above the query's mean score over the index) is at least "
                   f"{AUTO_RELEVANCE:g}.")
@click.option("--within", type=click.FloatRange(0, 2), metavar="DELTA",
              help="Keep results scoring at most DELTA below the best one (e.g. 0.05).")
@click.option("--collapse", is_flag=True, help="One result per group of near-duplicates (cosine >= 0.95).")
@click.option("--under", type=click.Path(path_type=Path), help="Only items whose file lies in this folder.")
@click.option("--after", metavar="DATE", help="Only images taken at or after DATE (ISO: 2024-05-31, 2024-05-31T18:00, "
              "with +02:00 for an instant; without, each photo's local time). Capture time: EXIF, else the file's mtime.")
@click.option("--before", metavar="DATE", help="Only images taken before DATE (as --after).")
@click.option("--camera", metavar="TEXT", help="Only images whose EXIF make or model contains TEXT (any case).")
@click.option("--ext", metavar="EXTS", help="Only files with these extensions, e.g. jpg,png.")
@click.option("--min-size", metavar="WxH", help="Only images at least W pixels wide and H high, e.g. 800x600.")
@_model_choice_option
@click.option("--semantic-only", is_flag=True, help="Rank by meaning (CLIP) alone.")
@click.option("--words-only", is_flag=True,
              help="Rank by matching words alone (file and folder names, EXIF, OCR text).")
@click.option("--sort", type=click.Choice(["score", "date"]), default="score", show_default=True,
              help="Order the results by the ranking, or by capture time (oldest first, undated last).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array (with each result's relevance).")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the results as a self-contained web page (thumbnails inside) to this file.")
@_device_option
@_quiet_option
@_reports_errors
def query(text: str | None, images: tuple[Path, ...], add: tuple[str, ...], subtract: tuple[str, ...],
          exclude: tuple[str, ...], index_dir: Path | None, target: str | None, k: int, min_score: float | str | None,
          within: float | None, collapse: bool, under: Path | None, model: str | None, semantic_only: bool,
          words_only: bool, sort: str, as_json: bool, html_file: Path | None, device: str, quiet: bool,
          db: str | None, vectors: str | None, **filters: str | None) -> None:
    """The `query` command (its help is QUERY_HELP); `filters` are --after, --before, --camera, --ext, --min-size."""
    _setup_logging(quiet)
    if text is None and not images:
        raise click.UsageError("give a TEXT query, --image PATH, or both")
    if text is not None and not images and not quiet and kind_of(Path(text)) == "image" and os.path.isfile(text):
        click.echo(f"hint: searching for the words {_shown(text)!r}; to search by that image, use --image", err=True)
    if semantic_only and words_only:
        raise click.UsageError("--semantic-only and --words-only exclude each other")
    mode = "semantic" if semantic_only else "words" if words_only else None
    parts = [*images, *([text] if text is not None else [])]
    with retrieval.open_index(index_dir, device=device, create=False, db=db, vectors=vectors) as idx:
        results = idx.search(parts[0] if len(parts) == 1 else parts, k=k, target=target, min_score=min_score,
                             under=under, add=add, subtract=subtract, exclude=exclude, within=within,
                             collapse=DEFAULT_THRESHOLD if collapse else None, model=model, mode=mode or "hybrid",
                             sort=sort, **filters)
        if html_file:
            from retrieval.gallery import Thumbnails, results_html

            title = text if not images else " + ".join([f"like {p.name}" for p in images] + ([text] if text else []))
            html_file.write_text(results_html(title, results, Thumbnails(idx)), encoding="utf-8")
            click.echo(f"wrote {html_file} ({len(results)} results)", err=True)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], ensure_ascii=False, indent=2))
        return
    if not results and not quiet:
        click.echo("no results", err=True)
    for r in results:
        shown = r.path if r.kind == "image" else f"{r.text}  [{Path(r.path).name}:{r.line}]"
        taken = f"{(r.taken or '-')[:16].replace('T', ' '):<16}  " if sort == "date" else ""
        click.echo(f"{r.rank:>3}  {r.score:.4f}  {taken}{_shown(shown)}")


@cli.command()
@_index_option
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=DEFAULT_THRESHOLD, show_default=True,
              help="Cosine similarity from which two images are near-duplicates.")
@_model_choice_option
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of groups.")
@_quiet_option
@_reports_errors
def dupes(index_dir: Path | None, threshold: float, model: str | None, as_json: bool, quiet: bool, db: str | None,
          vectors: str | None) -> None:
    """List groups of near-identical images, largest (most pixels) first. Reports only: never deletes or moves.

    \b
    "=" marks an exact copy (same content) of the member named after it, "~" a look-alike.
    Examples:
      mmsearch dupes
      mmsearch dupes --threshold 0.98 --json
    """
    _setup_logging(quiet)
    with retrieval.open_index(index_dir, create=False, db=db, vectors=vectors) as idx:
        groups = idx.duplicates(threshold, model)
    if as_json:
        click.echo(json.dumps([g.to_dict() for g in groups], ensure_ascii=False, indent=2))
        return
    for number, group in enumerate(groups, 1):
        click.echo(f"group {number}: {len(group.members)} images")
        for m in group.members:
            size = f"{m.width}x{m.height}" if m.width else "?"
            mark = f"= {_shown(m.copy_of)}" if m.copy_of else "~"
            click.echo(f"  {size:>11}  {_shown(m.path)}" + ("" if m is group.members[0] else f"  {mark}"))
    if not quiet:
        copies = sum(m.copy_of is not None for g in groups for m in g.members)
        click.echo(f"{len(groups)} groups, {sum(len(g.members) for g in groups)} images "
                   f"({copies} exact copies); nothing was changed", err=True)


@cli.command()
@_index_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--failures", "show_failures", is_flag=True, help="List skipped files and why.")
@_quiet_option
@_reports_errors
def info(index_dir: Path | None, as_json: bool, show_failures: bool, quiet: bool, db: str | None,
         vectors: str | None) -> None:
    """Show the index: location, model, counts, FAISS layout, size on disk."""
    _setup_logging(quiet)
    with retrieval.open_index(index_dir, create=False, db=db, vectors=vectors) as idx:
        data = idx.info()
        failures = idx.failures() if show_failures else []
    ignored = data["ignored_files"]
    if show_failures:
        data["failure_list"] = [{"path": p, "reason": r} for p, r in failures]
    if as_json:
        click.echo(json.dumps(data, ensure_ascii=False, indent=2))
        return
    model = data["model"]
    click.echo(f"index:    {_shown(data['index'])}")
    click.echo(_shown("stores:   " + "  ".join(f"{part}: {b['kind']} ({b['where']})"
                                                for part, b in data["backends"].items())))
    click.echo(_shown(f"model:    {'-' if model is None else model['name'] + ' / ' + str(model['pretrained']) + ', dim ' + str(model['dim'])}"))
    for m in data["models"]:
        click.echo(_shown(f"vectors:  {m['key']}{' (default)' if m['default'] else ''}: {m['images']} images, "
                          f"{m['texts']} texts  [{m['name']} / {m['pretrained']}, dim {m['dim']}]"))
    click.echo(f"images:   {data['images']}")
    click.echo(f"texts:    {data['texts']}")
    click.echo(f"files:    {data['files']}")
    click.echo(f"skipped:  {data['failures']}")
    click.echo(f"words:    {_describe_words(data['words'])}")
    click.echo(f"layout:   {', '.join(f'{k}: {v}' for k, v in data['layouts'].items()) or '-'}")
    click.echo(f"precision: {_describe_precision(data['precision'])}")
    for kind, vec in data["vector_index"].items():
        if vec["tuning"]:
            click.echo(f"tuned:    {kind}: {_tuning_line(vec)}")
    if data["max_memory"]:
        click.echo(f"budget:   {data['max_memory'] / 1e6:,.0f} MB for each vector index")
    click.echo(f"size:     {data['size_bytes'] / 1e6:.1f} MB")
    for root, opts in data["root_options"].items():
        shown = [f"exclude {' '.join(opts['exclude'])}"] if opts["exclude"] else []
        shown += ["hidden files included"] if opts["include_hidden"] else []
        shown += [f"text field {opts['text_field']}"] if opts["text_field"] else []
        click.echo(f"root:     {root}" + (f"  ({'; '.join(shown)})" if shown else ""))
    if ignored:
        types = ", ".join(f"{ext} {n}" for ext, n in data["ignored_types"].items())
        click.echo(f"ignored (unsupported types, not indexed): {len(ignored)}: {types}")
        for path in ignored[:20]:
            click.echo(f"ignored {path}")
        if len(ignored) > 20:
            click.echo(f"... and {len(ignored) - 20} more (`mmsearch info --json` lists them all)")
    for p, r in failures:
        click.echo(f"skipped {_shown(p)}: {_shown(r)}")


def _describe_words(counts: dict[str, int] | None) -> str:
    """'11 items (OCR: 4 images read, 1 with text)'; '-' for an index built before words search."""
    if counts is None:
        return "- (index built before words search: `mmsearch index` adds them)"
    return f"{counts['items']} items (OCR: {counts['ocr_read']} images read, {counts['ocr_text']} with text)"


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
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@_index_option
@click.option("--model", metavar="NAME", help="Instead of PATHS: remove this model's vectors (one added with "
              "`index --add-model`; the first model cannot be removed). Its name or its key from `info`.")
@_wait_option
@_quiet_option
@_reports_errors
def remove(paths: tuple[Path, ...], index_dir: Path | None, model: str | None, wait: float, quiet: bool,
           db: str | None, vectors: str | None) -> None:
    """Take PATHS (files or folders; they need not exist any more) out of the index; they are not re-scanned.

    With --model instead, remove one of the index's models (its vectors only; every item stays).
    """
    _setup_logging(quiet)
    if bool(paths) == bool(model):
        raise click.UsageError("give PATHS to remove, or --model NAME, not both")
    with retrieval.open_index(index_dir, create=False, wait=wait, db=db, vectors=vectors) as idx:
        if model:
            key = idx.model_of(model)
            removed = idx.remove_model(model)
            click.echo(f"removed model {key}: {removed} vectors; the index keeps every item", err=True)
            return
        removal = idx.remove(list(paths))
    click.echo(_shown(removal.summary()), err=True)


def _tuning_line(vec: dict[str, Any]) -> str:
    """'nprobe 96, rerank 8 -> recall@10 0.962 (target 0.95; 300 + 50 queries)'."""
    t = vec["tuning"]
    params = ", ".join(f"{k} {v}" for k, v in vec["params"].items())
    return (f"{params} -> recall@10 {t['recall']:.3f} (target {t['target_recall']:g}; "
            f"{t['queries']} + {t['cross_queries']} cross-modal queries, {t['seconds']:g} s)")


@cli.command()
@_index_option
@click.option("--faiss", "layout", help="FAISS index factory string to force (e.g. Flat, HNSW32); default: automatic.")
@_max_memory_option
@_wait_option
@_quiet_option
@_reports_errors
def reindex(index_dir: Path | None, layout: str | None, max_memory: int | None, wait: float, quiet: bool,
            db: str | None, vectors: str | None) -> None:
    """Rebuild the vector caches from the database, re-tuning their search parameters."""
    _setup_logging(quiet)
    with retrieval.open_index(index_dir, create=False, wait=wait, db=db, vectors=vectors) as idx:
        layouts = idx.reindex(layout, max_memory=max_memory)
        tuned = idx.info()["vector_index"]
    click.echo(", ".join(f"{kind}: {name}" for kind, name in layouts.items()), err=True)
    for kind, vec in tuned.items():
        if vec["tuning"]:
            click.echo(f"{kind}: {_tuning_line(vec)}", err=True)


@cli.command()
@click.option("--index", "index_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Build the demo index here and keep it (default: a temporary index, deleted afterwards).")
@click.option("--query", "text", default="a red circle", show_default=True, help="The text to search the demo for.")
@click.option("-k", "k", type=click.IntRange(1, 10000), default=5, show_default=True, help="Number of results.")
@click.option("--quiet", "-q", is_flag=True, help="No warnings or summary.")
@click.pass_context
@_reports_errors
def demo(ctx: click.Context, index_dir: Path | None, text: str, k: int, quiet: bool) -> None:
    """Index the bundled demo (colored shapes) with the bundled shapes-mini model and run a query.

    Needs no download and no checkout: both ship inside mmsearch (`retrieval.demo_path()`).
    """
    _setup_logging(quiet)
    demo_dir = retrieval.demo_path()
    with contextlib.nullcontext(index_dir) if index_dir else tempfile.TemporaryDirectory(prefix="mmsearch-demo-") as where:
        with retrieval.open_index(where, model=retrieval.DEMO_MODEL) as idx:
            report = idx.add([demo_dir])
        if not quiet:
            click.echo(f"{demo_dir}: {report.summary()}", err=True)
            click.echo(f"query: {text!r}", err=True)
        ctx.invoke(query, text=text, index_dir=Path(where), k=k)


@cli.command()
@_index_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --token (or --no-auth).")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--token", envvar="MMSEARCH_TOKEN",
              help="Secret every API request must carry (env MMSEARCH_TOKEN keeps it out of `ps`).")
@click.option("--no-auth", is_flag=True, help="Serve a non-loopback address without a token (anyone may search).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Another name clients use for this server (Host header), e.g. a DNS name. Repeatable.")
@click.option("--max-upload", type=click.FloatRange(0.001), default=20, show_default=True, metavar="MB",
              help="Largest query image accepted.")
@_device_option
@_quiet_option
@_reports_errors
def serve(index_dir: Path | None, host: str, port: int, token: str | None, no_auth: bool,
          allow_hosts: tuple[str, ...], max_upload: float, device: str, quiet: bool, db: str | None,
          vectors: str | None) -> None:
    """Serve a web gallery and a JSON API for the index (http://127.0.0.1:8765/)."""
    try:
        import uvicorn

        from retrieval import server
    except ImportError as exc:
        raise click.ClickException(f"`serve` needs the web extra ({exc.name} is missing): "
                                   "pip install 'mmsearch[serve]'") from None
    _setup_logging(quiet)
    warning = server.check_bind(host, token, no_auth)
    if warning:
        click.echo(f"warning: {warning}", err=True)
    with retrieval.open_index(index_dir, device=device, create=False, db=db, vectors=vectors) as idx:
        app = server.create_app(idx, host=host, token=token, allow_hosts=allow_hosts,
                                max_upload=int(max_upload * 1024 * 1024))
        server.prepare(idx)
        sock = server.listen(host, port)
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"serving {idx.storage.location} at http://{shown}:{sock.getsockname()[1]}/ (Ctrl-C stops)", err=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off")).run(sockets=[sock])


WATCH_HELP = """Keep the index current: index new and changed files under PATHS as they appear.

With no PATHS, watches every folder indexed before. Bursts are batched: a folder is re-scanned
(incrementally) after --settle seconds without changes, once every changed file has kept its
size and mtime that long (a photo still being copied waits). Deleted files leave through the
re-scan's prune rule, so an unmounted drive never empties the index; a vanished folder is
waited for. Ctrl-C or SIGTERM stops; everything committed is kept.

\b
Examples:
  mmsearch watch                       # every indexed folder
  mmsearch watch ~/photos --settle 5   # wait for 5 quiet seconds
  mmsearch watch /mnt/nas/photos --poll --interval 30   # network/FUSE mount: inotify sees nothing
"""


@cli.command(help=WATCH_HELP)
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@_index_option
@click.option("--interval", type=click.FloatRange(0.05), default=1.0, show_default=True, metavar="SECONDS",
              help="How often roots are checked (and, with --poll, scanned for changes).")
@click.option("--settle", type=click.FloatRange(0), default=2.0, show_default=True, metavar="SECONDS",
              help="Quiet time before a batch, and how long a file must keep its size and mtime.")
@click.option("--poll", is_flag=True, help="Poll instead of inotify (network and FUSE mounts); "
              "also used by itself where inotify is unavailable or out of watches.")
@_device_option
@_wait_option
@_quiet_option
@_reports_errors
def watch(paths: tuple[Path, ...], index_dir: Path | None, interval: float, settle: float, poll: bool,
          device: str, wait: float, quiet: bool, db: str | None, vectors: str | None) -> None:
    import signal
    import threading
    import time

    from retrieval.watch import Watcher, watch_roots

    _setup_logging(quiet)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def on_batch(roots: list[str], report: Any) -> None:
        if not quiet:
            click.echo(f"{time.strftime('%H:%M:%S')} {_shown(', '.join(roots))}: {report.summary()}", err=True)

    # A held lock is waited for at least one --interval per try, then retried (with a warning).
    with retrieval.open_index(index_dir, device=device, wait=max(wait, interval), create=False, db=db,
                              vectors=vectors) as idx:
        roots = watch_roots(idx, [str(p) for p in paths])
        watcher = Watcher(idx, roots, settle=settle, interval=interval, poll=poll, on_batch=on_batch)
        if not quiet:
            click.echo(f"watching {_shown(', '.join(roots))} ({'polling' if poll else 'inotify'}; Ctrl-C stops)", err=True)
        try:
            watcher.run(stop)
        except KeyboardInterrupt:
            pass
    click.echo("stopped; everything committed is kept", err=True)


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
