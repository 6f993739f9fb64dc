"""Converters from public dataset formats (CC3M/LAION, WebVid, AudioCaps, NExT-GPT T2M and MosIT) to anyverse manifests.

Nothing is downloaded: every row must point at a file already on disk, through a path column or the layout that the
dataset's own download tool writes under ``media_root``. A bad row is skipped and counted by reason, never fatal; only a
missing or unreadable source, an unknown format or a file without the columns a format needs stops a conversion.
Field names and layouts, and where each was verified, are in ``datasets/README.md`` and the dataset cards beside it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ValidationError

from anyverse.train.manifest import DialogRecord, MediaRef, PairRecord, RequestRecord, TurnRecord, write_manifest
from anyverse.types import Modality

log = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 1000
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
AUDIO_SUFFIXES = frozenset({".wav", ".flac", ".mp3", ".ogg"})

Role = Literal["user", "assistant"]
OutputModality = Literal[Modality.IMAGE, Modality.VIDEO, Modality.AUDIO]
_OUTPUTS: dict[str, OutputModality] = {"image": Modality.IMAGE, "video": Modality.VIDEO, "audio": Modality.AUDIO}
_ROLES: dict[str, Role] = {"human": "user", "gpt": "assistant"}
_CAPTION_COLUMNS = ("caption", "text")  # CC3M after img2dataset's header line; LAION's TEXT (columns are lower-cased)
_PATH_COLUMNS = ("path", "filepath", "image", "file")
_PLACEHOLDER = re.compile(r"<(image|video|audio)>")  # NExT-GPT's DEFAULT_{IMAGE,VIDEO,AUDIO}_TOKEN
_TAG = re.compile(r"<(image|video|audio)>(.*?)</\1>", re.IGNORECASE | re.DOTALL)  # MosIT's <Image>...</Image>
_FILE_NAME = re.compile(r"[^\s<>]+\.(?:jpe?g|png|webp|gif|mp4|webm|avi|mov|mkv|wav|flac|mp3|ogg)", re.IGNORECASE)

R = TypeVar("R", PairRecord, DialogRecord)
T = TypeVar("T")
Row = tuple[int, dict[str, str]]  # (row index, as img2dataset counts it; lower-cased column -> value)


@dataclass
class ConvertReport:
    """What a conversion kept and why it skipped the rest, counted by reason; ``summary()`` is the line to show."""

    fmt: str
    source: Path
    output: Path
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, f"{where}: {detail}" if detail else where)

    def summary(self) -> str:
        head = f"{self.fmt} {self.source} -> {self.output}: {self.kept} records"
        if not self.skipped:
            return head
        reasons = "; ".join(f"{n} {reason} (first: {self.examples[reason]})" for reason, n in self.skipped.items())
        return f"{head}, skipped {sum(self.skipped.values())}: {reasons}"


class _Skip(Exception):
    """One bad row or dialog: the loop counts it under ``reason`` and goes on."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def convert(fmt: str, source: Path, output: Path, media_root: Path | None = None) -> ConvertReport:
    """Convert ``source`` in format ``fmt`` into the JSONL manifest ``output`` (pairs or dialogs).

    Media are looked up under ``media_root`` (default: the source's directory) and written relative to the output's
    directory, so the manifest can move together with its media.
    """
    if fmt not in _CONVERTERS:
        raise ValueError(f"unknown dataset format {fmt!r}; known: {', '.join(FORMATS)}")
    if not source.is_file():
        raise FileNotFoundError(f"{source}: source file not found")
    root = media_root if media_root is not None else source.parent
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: media root is not a directory")
    if output.resolve() == source.resolve():
        raise ValueError(f"{output}: the output would overwrite the source")
    report = ConvertReport(fmt, source, output)
    try:
        records = _CONVERTERS[fmt](source, root, output.resolve().parent, report)
        write_manifest(output, records)
    except OSError as err:  # unreadable source, unwritable output: one line naming the file, not a traceback
        raise ValueError(f"{err.filename or source}: {err.strerror or err}") from err
    return report


# ---- shared pieces ----------------------------------------------------------------------------------------------


def _collect(entries: Iterable[tuple[str, T]], build: Callable[[T], R], report: ConvertReport) -> list[R]:
    """Build one record per entry; a bad one is counted in ``report`` under its reason and the rest go on."""
    records: list[R] = []
    for where, entry in entries:
        try:
            records.append(build(entry))
        except _Skip as skip:
            report.skip(skip.reason, where, skip.detail)
        except ValidationError as err:
            report.skip("invalid record", where, str(err.errors()[0]["msg"]))
    report.kept = len(records)
    return records


def _caption(value: object) -> str:
    """Whitespace-normalised caption; empty or over-long ones skip the row (a 1000-character caption is not one)."""
    text = " ".join(value.split()) if isinstance(value, str) else ""
    if not text:
        raise _Skip("empty caption")
    if len(text) > MAX_CAPTION_CHARS:
        raise _Skip("caption too long", f"{len(text)} characters (max {MAX_CAPTION_CHARS})")
    return text


def _manifest_path(path: Path, out_dir: Path) -> str:
    """Relative to the manifest's directory; both sides resolved, so '..' lands right through symlinked folders."""
    target = path.resolve()
    try:
        return os.path.relpath(target, out_dir)
    except ValueError:  # Windows, another drive: no relative path exists
        return str(target)


def _is_file(path: Path) -> bool:
    """Like Path.is_file, but an unreadable folder on the way is a missing file for one row, not a failed run."""
    try:
        return path.is_file()
    except OSError:
        return False


def _media_file(root: Path, name: str) -> Path:
    """An existing file named by a row: absolute, or relative to the media root."""
    path = Path(name.strip()).expanduser()
    path = path if path.is_absolute() else root / path
    if not name.strip() or not _is_file(path):
        raise _Skip("missing file", str(path))
    return path


def _first_file(candidates: list[Path]) -> Path:
    for path in candidates:
        if _is_file(path):
            return path
    raise _Skip("missing file", " or ".join(str(p) for p in candidates))


def _scan(root: Path, suffixes: frozenset[str]) -> dict[str, Path]:
    """Every file under ``root`` with one of ``suffixes``, by stem: one directory walk instead of a lookup per row."""
    found: dict[str, Path] = {}
    duplicates = 0
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in sorted(names):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in suffixes:
                continue
            if stem in found:
                duplicates += 1
            else:
                found[stem] = Path(folder, name)
    if duplicates:
        log.warning("%s: %d files share a name with an earlier one (another folder or extension); the first is used",
                    root, duplicates)
    return found


# ---- tables: CSV/TSV (stdlib) and parquet (pyarrow, optional) ----------------------------------------------------


def _table(source: Path, report: ConvertReport, known: frozenset[str] = frozenset(),
           headerless: tuple[str, ...] = ()) -> tuple[list[str], Iterator[tuple[str, Row]]]:
    """Column names (lower-cased) and the rows of a table; malformed rows are counted and skipped.

    A first line naming none of the ``known`` columns, with as many fields as ``headerless``, is data under those
    names: CC3M's own ``Train_GCC-training.tsv`` has no header line.
    """
    if source.suffix.lower() == ".parquet":
        return _parquet(source)
    # TSV files are not quoted: a caption that starts with '"' must not swallow the lines after it.
    tsv = source.suffix.lower() == ".tsv"
    with source.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
        try:
            first = next(csv.reader(handle, delimiter="\t" if tsv else ",",
                                    quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL), [])
        except csv.Error as err:
            raise ValueError(f"{source}: unreadable header line: {err}") from None
    columns = [name.strip().lower() for name in first]
    has_header = not (headerless and len(columns) == len(headerless) and not known.intersection(columns))
    columns = columns if has_header else list(headerless)

    def rows() -> Iterator[tuple[str, Row]]:
        index = 0
        with source.open(encoding="utf-8-sig", errors="replace", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t" if tsv else ",",
                                quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
            if has_header:
                next(reader, None)
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as err:
                    report.skip("unparseable row", f"line {reader.line_num}", str(err))
                    index += 1
                    continue
                if not fields:
                    continue  # blank line: not a row (img2dataset's reader skips them too)
                if len(fields) != len(columns):
                    report.skip("unparseable row", f"line {reader.line_num}",
                                f"{len(fields)} fields, the header has {len(columns)}")
                else:
                    yield f"line {reader.line_num}", (index, dict(zip(columns, fields, strict=True)))
                index += 1

    return columns, rows()


def _parquet(source: Path) -> tuple[list[str], Iterator[tuple[str, Row]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{source}: reading parquet needs pyarrow (not installed): pip install pyarrow") from None
    try:
        table = pq.ParquetFile(source)
    except Exception as err:  # pyarrow raises its own ArrowInvalid / ArrowIOError types
        raise ValueError(f"{source}: not a readable parquet file: {err}") from None

    def rows() -> Iterator[tuple[str, Row]]:
        index = 0
        for batch in table.iter_batches():
            for row in batch.to_pylist():
                yield f"row {index}", (index, {k.lower(): "" if v is None else str(v) for k, v in row.items()})
                index += 1

    return [name.lower() for name in table.schema_arrow.names], rows()


def _pick(columns: list[str], names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in columns), None)


def _pairs(rows: Iterator[tuple[str, Row]], modality: Modality, caption_column: str,
           find: Callable[[int, dict[str, str]], Path], out_dir: Path, report: ConvertReport) -> list[PairRecord]:
    def build(row: Row) -> PairRecord:
        index, values = row
        caption = _caption(values[caption_column])
        return PairRecord(media=_manifest_path(find(index, values), out_dir), modality=modality, caption=caption)

    return _collect(rows, build, report)


def _cc3m(source: Path, root: Path, out_dir: Path, report: ConvertReport) -> list[PairRecord]:
    """CC3M / LAION-style tables: a caption plus a local path, or an img2dataset download of the url column."""
    known = frozenset({*_CAPTION_COLUMNS, *_PATH_COLUMNS, "url", "key"})
    columns, rows = _table(source, report, known, headerless=("caption", "url"))
    caption_column = _pick(columns, _CAPTION_COLUMNS)
    if caption_column is None:
        raise ValueError(f"{source}: no caption column (caption or TEXT); columns: {', '.join(columns) or 'none'}")
    path_column = _pick(columns, _PATH_COLUMNS)
    if path_column is not None:
        return _pairs(rows, Modality.IMAGE, caption_column, lambda _, row: _media_file(root, row[path_column]),
                      out_dir, report)

    # img2dataset names each file by its key: the row's index, 9 digits, with its default shard settings.
    found = _scan(root, IMAGE_SUFFIXES)
    key_column = _pick(columns, ("key",))

    def find(index: int, row: dict[str, str]) -> Path:
        key = row[key_column].strip() if key_column else f"{index:09d}"
        for name in (key, key.zfill(9)):
            if name in found:
                return found[name]
        raise _Skip("missing file", f"{key}.jpg|png|webp under {root}")

    return _pairs(rows, Modality.IMAGE, caption_column, find, out_dir, report)


def _webvid(source: Path, root: Path, out_dir: Path, report: ConvertReport) -> list[PairRecord]:
    """WebVid CSV (videoid, contentUrl, duration, page_dir, name): {root}/{page_dir}/{videoid}.mp4 or {videoid}.mp4."""
    columns, rows = _table(source, report)
    caption_column = _pick(columns, ("name", "caption"))
    if "videoid" not in columns or caption_column is None:
        raise ValueError(f"{source}: WebVid needs videoid and name (or caption) columns; "
                         f"columns: {', '.join(columns) or 'none'}")

    def find(_: int, row: dict[str, str]) -> Path:
        videoid, page_dir = row["videoid"].strip(), row.get("page_dir", "").strip()
        if not videoid:
            raise _Skip("missing file", "empty videoid")
        return _first_file(([root / page_dir / f"{videoid}.mp4"] if page_dir else []) + [root / f"{videoid}.mp4"])

    return _pairs(rows, Modality.VIDEO, caption_column, find, out_dir, report)


def _start_forms(start: str) -> list[str]:
    """'30' and '30.0' both name the clip that starts at 30 s."""
    forms = [start] if start else []
    try:
        seconds = float(start)
    except ValueError:
        return forms
    if seconds.is_integer() and str(int(seconds)) != start:
        forms.append(str(int(seconds)))
    return forms


def _audiocaps(source: Path, root: Path, out_dir: Path, report: ConvertReport) -> list[PairRecord]:
    """AudioCaps CSV (audiocap_id, youtube_id, start_time, caption): files named by audiocap_id (audiocaps-download,
    NExT-GPT), {youtube_id}_{start_time} or {youtube_id}, anywhere under the media root."""
    columns, rows = _table(source, report)
    if "caption" not in columns or not {"audiocap_id", "youtube_id"}.intersection(columns):
        raise ValueError(f"{source}: AudioCaps needs caption and audiocap_id or youtube_id columns; "
                         f"columns: {', '.join(columns) or 'none'}")
    found = _scan(root, AUDIO_SUFFIXES)

    def find(_: int, row: dict[str, str]) -> Path:
        youtube_id = row.get("youtube_id", "").strip()
        names = [row.get("audiocap_id", "").strip()]
        if youtube_id:
            names += [f"{youtube_id}_{start}" for start in _start_forms(row.get("start_time", "").strip())]
            names.append(youtube_id)
        names = [name for name in names if name]
        for name in names:
            if name in found:
                return found[name]
        raise _Skip("missing file", f"{' | '.join(names) or 'no id'} (.wav/.flac/.mp3/.ogg) under {root}")

    return _pairs(rows, Modality.AUDIO, "caption", find, out_dir, report)


# ---- NExT-GPT dialogs ---------------------------------------------------------------------------------------------


@dataclass
class _Turn:
    role: Role
    text: str
    media: list[tuple[Modality, Path]] = field(default_factory=list)  # user: attached files, in order
    requests: list[tuple[OutputModality, object]] = field(default_factory=list)  # assistant: media to make + caption


def _clean(text: str) -> str:
    """Text with its media tags gone: no doubled spaces or blank edges left behind."""
    return re.sub(r" *\n *", "\n", re.sub(r"[ \t]+", " ", text)).strip()


def _conversation(item: dict[str, Any], key: str) -> list[tuple[Role, str, dict[str, Any]]]:
    turns = item.get(key)
    if not isinstance(turns, list) or not turns:
        raise _Skip("no conversation", f"no {key!r} list")
    out = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise _Skip("unparseable item", "a turn without a text 'value'")
        speaker = turn.get("from")
        role = _ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise _Skip("unknown speaker", repr(turn.get("from")))
        out.append((role, turn["value"], turn))
    return out


def _strings(value: object) -> list[str]:
    """NExT-GPT writes a one-item list or a bare string for these fields."""
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _take(queue: list[T], reason: str, detail: str) -> T:
    if not queue:
        raise _Skip(reason, detail)
    return queue.pop(0)


def _from_t2x(item: dict[str, Any]) -> list[_Turn]:
    """``{image,video,audio}_t2x.json``: the gpt turn names what it makes in ``output_modality`` and ``caption``."""
    turns = []
    for role, value, turn in _conversation(item, "conversation"):
        requests: list[tuple[OutputModality, object]] = []
        output = turn.get("output_modality")
        if role == "assistant" and isinstance(output, str) and output in _OUTPUTS:
            if not isinstance(turn.get("caption"), str) or not turn["caption"].strip():
                raise _Skip("output media without caption", f"{output} in a gpt turn")
            requests.append((_OUTPUTS[output], turn["caption"]))
        turns.append(_Turn(role, _clean(value), requests=requests))
    return turns


def _from_conversations(item: dict[str, Any], root: Path) -> list[_Turn]:
    """``*_instruction_tuning.json`` (NExT-GPT's prepare_data.py output, read by its LazySupervisedDataset).

    ``<image>``/``<video>``/``<audio>`` in a gpt turn takes the next of ``{m}_captions``; in a human turn, the next file
    of ``input_{m}``. Their own pipeline asserts that the counts match, so a mismatch skips the dialog.
    """
    captions = {m: _strings(item.get(f"{m.value}_captions")) for m in _OUTPUTS.values()}
    inputs = {m: _strings(item.get(f"input_{m.value}")) for m in _OUTPUTS.values()}
    turns = []
    for role, value, _ in _conversation(item, "conversations"):
        kinds = [_OUTPUTS[kind] for kind in _PLACEHOLDER.findall(value)]
        text = _clean(_PLACEHOLDER.sub(" ", value))
        if role == "user":
            files = [(m, _take(inputs[m], "placeholder without input file", f"<{m.value}>")) for m in kinds]
            turns.append(_Turn(role, text, media=[(m, _media_file(root, name)) for m, name in files]))
        else:
            requests: list[tuple[OutputModality, object]] = [
                (m, _take(captions[m], "output media without caption", f"<{m.value}>")) for m in kinds]
            turns.append(_Turn(role, text, requests=requests))
    left = [f"{len(v)} {m.value}_captions" for m, v in captions.items() if v]
    left += [f"{len(v)} input_{m.value}" for m, v in inputs.items() if v]
    if left:
        raise _Skip("placeholders and media lists differ", f"{', '.join(left)} without a placeholder")
    return turns


def _from_mosit(item: dict[str, Any], root: Path) -> list[_Turn]:
    """``mosit.json``: each dialog lists its media in ``image_list``/``video_list``/``audio_list`` (``{m}_name``,
    ``caption``, ``data_source``) and names them inline, ``<Image>mosit_i_0000000_00.jpg</Image>``.

    A named file in a gpt turn is media to make (prompt: its caption); in a human turn, an attachment. Tags holding free
    text are dropped, as NExT-GPT's own prepare_data.py drops them.
    """
    listed: dict[Modality, dict[str, object]] = {}
    for m in _OUTPUTS.values():
        entries = item.get(f"{m.value}_list")
        listed[m] = {entry[f"{m.value}_name"]: entry.get("caption") for entry in entries or []
                     if isinstance(entry, dict) and isinstance(entry.get(f"{m.value}_name"), str)
                     } if isinstance(entries, list) else {}
    turns = []
    for role, value, _ in _conversation(item, "conversation"):
        tags = [(_OUTPUTS[kind.lower()], content.strip()) for kind, content in _TAG.findall(value)]
        named = [(m, name) for m, name in tags if name in listed[m] or _FILE_NAME.fullmatch(name)]
        text = _clean(_TAG.sub(" ", value))
        if role == "user":
            turns.append(_Turn(role, text, media=[(m, _media_file(root, name)) for m, name in named]))
            continue
        for m, name in named:
            caption = listed[m].get(name)
            if not isinstance(caption, str) or not caption.strip():
                raise _Skip("output media without caption", name)
        turns.append(_Turn(role, text, requests=[(m, listed[m][name]) for m, name in named]))
    return turns


def _dialog_record(turns: list[_Turn], out_dir: Path) -> DialogRecord:
    """Ids count per modality through the dialog, generated media included, as a session numbers them at run time."""
    roles = [turn.role for turn in turns]
    if len(turns) < 2 or roles != ["user", "assistant"] * (len(turns) // 2):
        raise _Skip("turns not alternating human/gpt", "/".join(roles))
    seen: Counter[Modality] = Counter()
    messages = []
    for turn in turns:
        refs, requests = [], []
        for modality, path in turn.media:
            seen[modality] += 1
            refs.append(MediaRef(id=f"{modality.label}_{seen[modality]}", media=_manifest_path(path, out_dir),
                                 modality=modality))
        for modality, caption in turn.requests:
            seen[modality] += 1
            requests.append(RequestRecord(modality=modality, prompt=_caption(caption)))
        messages.append(TurnRecord(role=turn.role, text=turn.text, media=refs, requests=requests))
    return DialogRecord(messages=messages)


def _dialogs(parse: Callable[[dict[str, Any], Path], list[_Turn]]
             ) -> Callable[[Path, Path, Path, ConvertReport], list[DialogRecord]]:
    def run(source: Path, root: Path, out_dir: Path, report: ConvertReport) -> list[DialogRecord]:
        try:
            with source.open(encoding="utf-8") as handle:
                items = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{source}: not a JSON file: {err}") from None
        if not isinstance(items, list):
            raise ValueError(f"{source}: expected a JSON list of dialogs, found a {type(items).__name__}")

        def build(item: object) -> DialogRecord:
            if not isinstance(item, dict):
                raise _Skip("unparseable item", f"a {type(item).__name__}, not an object")
            return _dialog_record(parse(item, root), out_dir)

        return _collect(((f"item {i}", item) for i, item in enumerate(items)), build, report)

    return run


def _t2m(item: dict[str, Any], root: Path) -> list[_Turn]:
    return _from_t2x(item) if "conversation" in item else _from_conversations(item, root)


def _mosit(item: dict[str, Any], root: Path) -> list[_Turn]:
    return _from_mosit(item, root) if "conversation" in item else _from_conversations(item, root)


_CONVERTERS: dict[str, Callable[[Path, Path, Path, ConvertReport], list[PairRecord] | list[DialogRecord]]] = {
    "cc3m": _cc3m,
    "webvid": _webvid,
    "audiocaps": _audiocaps,
    "nextgpt-t2m": _dialogs(_t2m),
    "mosit": _dialogs(_mosit),
}
FORMATS = tuple(_CONVERTERS)
