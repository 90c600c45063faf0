"""DomainNet (``data=domainnet``): six domains of the same 345 classes, each domain a task.

Official layout (``python -m cwps_lightning.data download +experiment=domainnet`` makes it)::

    <root>/<domain>/<class>/<file>.jpg
    <root>/<domain>_train.txt        lines: clipart/aircraft_carrier/clipart_001_000018.jpg 0
    <root>/<domain>_test.txt

The split files are the truth: a task's images are the lines of its split files and its labels
are the numbers written there, so a class missing from a domain (or from one split) never shifts
the others. ``data.num_classes`` (345) sizes every head; null takes the largest label found in
any split file under the root, plus one. Transforms follow TAPS for DomainNet (policy ``rrc``):
random resized crop 224 + flip for training, resize 256 -> centre crop 224 for test.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import short_list
from .base import DataConfigError
from .image_tasks import ImageTasksDataModule, TaskSource
from .images import is_image_file

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
SPLITS = ("train", "test")
NUM_CLASSES = 345
#: (train, test) lines of the official split files of the cleaned release
REFERENCE_COUNTS = {
    "clipart": (33525, 14604),
    "infograph": (36023, 15582),
    "painting": (50416, 21850),
    "quickdraw": (120750, 51750),
    "real": (120906, 52041),
    "sketch": (48212, 20916),
}
LINE_FORMAT = "'<domain>/<class>/<file> <label>'"


@dataclass
class SplitEntry:
    rel: str  # path relative to the root, as written in the split file
    label: int
    line: int

    @property
    def class_name(self) -> str | None:
        parts = Path(self.rel).parts
        return parts[1] if len(parts) >= 3 else None


def _lines(where: list[str]) -> str:
    return f"{len(where)} line(s) ({', '.join(where[:2])}{', ...' if len(where) > 2 else ''})"


def parse_split_file(path: Path) -> tuple[list[SplitEntry], list[str]]:
    """Entries of a split file, and one message per malformed line."""
    entries: list[SplitEntry] = []
    bad: list[str] = []
    # (utf-8-sig: a byte-order mark that an editor wrote is not part of the first path)
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            parts = line.rsplit(maxsplit=1)
            try:
                if len(parts) != 2:
                    raise ValueError
                label = int(parts[1])
                if label < 0:
                    raise ValueError
            except ValueError:
                bad.append(f"{path.name}:{number}: expected {LINE_FORMAT}, got {line[:80]!r}")
                continue
            entries.append(SplitEntry(parts[0], label, number))
    return entries, bad


class DomainNetDataModule(ImageTasksDataModule):
    # the order of the paper's Table 2 (bottom) columns
    default_tasks = ("real", "painting", "quickdraw", "clipart", "infograph", "sketch")
    pretrain_task = None  # T0 is an ImageNet-pretrained backbone (model.pretrained / weights)
    benchmark = "DomainNet"
    layout = ("<root>/<domain>/<class>/<file> with split files <root>/<domain>_train.txt and "
              f"<root>/<domain>_test.txt of lines {LINE_FORMAT}")
    obtain = ("download it with python -m cwps_lightning.data download +experiment=domainnet "
              "data.root=<dir> (docs/datasets.md, 'data download')")
    default_policy = "rrc"

    def __init__(self, num_classes: int | None = NUM_CLASSES,
                 download: Mapping | None = None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes_setting = num_classes
        if download is not None and not isinstance(download, Mapping):
            self._deferred.append(f"data.download must be a mapping of download settings "
                                  f"(base_url, archives, ...) or null, got {download!r}")
            download = None
        self.download = dict(download or {})
        self._parsed: dict[Path, tuple[list[SplitEntry], list[str]]] = {}
        self._table: tuple[dict[int, str], list[str]] | None = None
        #: the 'file:line' places of the class table's conflicts
        self._conflicted: set[str] = set()

    def known_tasks(self) -> list[str]:
        return list(DOMAINS)

    # -- split files ---------------------------------------------------------------------------
    def split_file(self, domain: str, split: str) -> Path:
        return self.root / f"{domain}_{split}.txt"

    def parsed(self, path: Path) -> tuple[list[SplitEntry], list[str]]:
        if path not in self._parsed:
            self._parsed[path] = parse_split_file(path)
        return self._parsed[path]

    def present_split_files(self) -> list[Path]:
        return [self.split_file(d, s) for d in DOMAINS for s in SPLITS
                if self.split_file(d, s).is_file()]

    def class_table(self) -> tuple[dict[int, str], list[str]]:
        """label -> class name over every split file under the root, and the conflicts."""
        if self._table is None:
            self._table = self._build_class_table()
        return self._table

    def _build_class_table(self) -> tuple[dict[int, str], list[str]]:
        # A label's class is the one most of its lines give (ties: the first seen), and a
        # class's label likewise: one wrong line is then the line named, where taking the
        # first line's word made a wrong first line blame every right one.
        lines: dict[tuple[int, str], list[str]] = {}
        order: dict[str, int] = {}  # file:line -> its place in reading order
        for path in self.present_split_files():
            for e in self.parsed(path)[0]:
                if e.class_name is not None:
                    at = f"{path.name}:{e.line}"
                    order[at] = len(order)
                    lines.setdefault((e.label, e.class_name), []).append(at)
        names: dict[int, str] = {}
        for (label, name), where in lines.items():
            if label not in names or len(where) > len(lines[label, names[label]]):
                names[label] = name
        labels: dict[str, int] = {}
        for label, name in names.items():
            if name not in labels or len(lines[label, name]) > len(lines[labels[name], name]):
                labels[name] = label
        conflicts: list[tuple[str, str]] = []
        for (label, name), where in lines.items():
            if names[label] != name:
                said = (f"label {label} is class {names[label]!r} on "
                        f"{_lines(lines[label, names[label]])} but {name!r} here")
            elif labels[name] != label:
                said = (f"class {name!r} has label {labels[name]} on "
                        f"{_lines(lines[labels[name], name])} but {label} here")
            else:
                continue
            conflicts += [(at, f"{at}: {said}") for at in where]
        self._conflicted = {at for at, _ in conflicts}
        # a label whose class is another label's has no class of its own
        names = {label: name for label, name in names.items() if labels[name] == label}
        return names, [msg for _, msg in sorted(conflicts, key=lambda c: order[c[0]])]

    def resolved_num_classes(self, table: Mapping[int, str]) -> int:
        value = self.num_classes_setting
        if value is None:
            found = max(table) + 1 if table else 0
            if found == 1:  # (a head of one class: see scan.single_class_error)
                raise DataConfigError(f"data.num_classes=null: the split files under {self.root} "
                                      f"have the single label 0 ({table[0]!r}); a task needs 2 "
                                      f"or more classes")
            return found
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise DataConfigError(f"data.num_classes must be an integer >= 2 (a task needs 2 or "
                                  f"more classes) or null, got {value!r}")
        return value

    # -- loading -------------------------------------------------------------------------------
    def load_source(self, task: str) -> TaskSource:
        files = {s: self.split_file(task, s) for s in SPLITS}
        absent = [p.name for p in files.values() if not p.is_file()]
        if absent:
            raise self.layout_error(f"no split file(s) {', '.join(absent)}")
        table, conflicts = self.class_table()
        if conflicts:
            raise DataConfigError(f"DomainNet split files disagree on labels: "
                                  f"{short_list(conflicts, 5)}")
        num_classes = self.resolved_num_classes(table)
        samples: dict[str, list[tuple[str, int]]] = {}
        for split, path in files.items():
            entries, bad = self.parsed(path)
            if bad:
                raise DataConfigError(f"{path} has {len(bad)} malformed line(s): "
                                      f"{short_list(bad, 5)}")
            if not entries:
                raise DataConfigError(f"{path} lists no images")
            out_of_range = [f"line {e.line}: label {e.label}" for e in entries
                            if e.label >= num_classes]
            if out_of_range:
                raise DataConfigError(
                    f"{path}: {len(out_of_range)} label(s) outside [0, {num_classes}) "
                    f"({short_list(out_of_range, 5)}); the head has data.num_classes="
                    f"{num_classes} classes"
                )
            pairs = [(str(self.root / e.rel), e.label) for e in entries]
            missing = [f"line {e.line}: {e.rel}" for e, (p, _) in zip(entries, pairs, strict=True)
                       if not os.path.isfile(p)]
            if missing:
                hint = ("" if (self.root / task).is_dir()
                        else f"; {self.root / task}/ does not exist: is the archive extracted?")
                raise DataConfigError(f"split file {path} names {len(missing)} missing "
                                      f"image(s): {short_list(missing, 5)}{hint}")
            samples[split] = pairs
        classes = [table.get(i, f"<label {i}>") for i in range(num_classes)]
        return TaskSource(task, num_classes, samples["train"], samples["test"],
                          self.policy_for(task), classes)

    # -- checking ------------------------------------------------------------------------------
    def check_dataset(self, report) -> None:
        if not self.present_split_files():
            report.error("layout", str(self.layout_error("no <domain>_train.txt split file")))
            return
        table, conflicts = self.class_table()
        for msg in conflicts:
            report.error("label", msg)
        try:
            num_classes = self.resolved_num_classes(table)
        except DataConfigError as err:
            report.error("config", str(err))
            num_classes = max(table) + 1 if table else 0
        if len(table) != NUM_CLASSES:
            report.warn("count", f"the split files under {self.root} name {len(table)} "
                        f"classes; DomainNet has {NUM_CLASSES}")
        paths: list[str] = []
        for domain in self.tasks_requested:
            paths += self.check_domain(report, domain, table, num_classes)
        report.decode_all(paths)

    def check_domain(self, report, domain: str, table: Mapping[int, str],
                     num_classes: int) -> list[str]:
        ddir = self.root / domain
        if not ddir.is_dir():
            report.error("layout", f"missing domain folder {ddir} (expected {self.layout})",
                         task=domain)
        listed: set[str] = set()
        in_split: dict[str, set[int]] = {}
        counts = {}
        dir_exists: dict[Path, bool] = {}
        for split in SPLITS:
            path = self.split_file(domain, split)
            if not path.is_file():
                report.error("layout", f"missing split file {path}", task=domain)
                continue
            entries, bad = self.parsed(path)
            for msg in bad:
                report.error("split-file", msg, task=domain)
            counts[split] = len(entries)
            in_split[split] = {e.label for e in entries}
            seen: set[str] = set()
            for e in entries:
                where = f"{path.name}:{e.line}"
                if e.rel in seen:
                    report.warn("duplicate", f"{where}: {e.rel} is listed twice", task=domain)
                seen.add(e.rel)
                # (with data.num_classes=null the range is the class table's, which a
                # conflicting line's label may have left: that line is named once, as the
                # conflict; a head size set by hand is its own check)
                derived = self.num_classes_setting is None and where in self._conflicted
                if e.label >= num_classes and not derived:
                    report.error("label", f"{where}: label {e.label} is outside "
                                 f"[0, {num_classes})", task=domain)
                if Path(e.rel).parts[:1] != (domain,):
                    report.warn("layout", f"{where}: {e.rel} is not under {domain}/",
                                task=domain)
                full = self.root / e.rel
                parent = full.parent
                if parent not in dir_exists:
                    dir_exists[parent] = parent.is_dir()
                # a file whose class folder is missing is reported once, as a missing class
                if dir_exists[parent] and not full.is_file():
                    report.error("missing-file", f"{where}: {e.rel} does not exist",
                                 task=domain)
                listed.add(str(full))
        if ddir.is_dir():
            on_disk = {p.name for p in ddir.iterdir() if p.is_dir()}
            for label in sorted(table):
                cls = table[label]
                if cls in on_disk:
                    continue
                uses = sum(1 for s in SPLITS for e in self.parsed_or_empty(domain, s)
                           if e.label == label)
                # (a class that neither split lists needs no folder: the splits' own warning,
                # class-not-in-split, says it; training and evaluation do not miss it)
                if uses:
                    report.error("missing-class", f"class folder {ddir / cls} (label {label}) "
                                 f"is missing; the split files list {uses} image(s) in it",
                                 task=domain)
            for split, labels in in_split.items():
                absent = sorted(set(table) - labels)
                if absent:
                    report.warn("class-not-in-split", f"{domain}_{split}.txt has no image of "
                                f"{len(absent)} class(es) "
                                f"({short_list([f'{table[i]} ({i})' for i in absent], 5)}); "
                                f"labels are unaffected", task=domain)
            unlisted = [p for p in _images_under(ddir) if p not in listed]
            if unlisted:
                report.info(f"{domain}: {len(unlisted)} image(s) on disk are in no split file "
                            f"(e.g. {unlisted[0]})", task=domain)
        ref = REFERENCE_COUNTS.get(domain)
        for split, want in zip(SPLITS, ref, strict=True) if ref else ():
            if split in counts and counts[split] != want:
                report.warn("count", f"{domain}_{split}.txt lists {counts[split]} images, the "
                            f"official file {want}", task=domain)
        # (with no domain folder, the split files' counts are of images not there to read)
        where = "" if ddir.is_dir() else f", none on disk ({ddir} is missing)"
        report.info(f"{domain}: train {counts.get('train', 0)} images, test "
                    f"{counts.get('test', 0)} images, {len(in_split.get('train', ()))} classes "
                    f"in train{where}", task=domain)
        return sorted(p for p in listed if os.path.isfile(p))

    def parsed_or_empty(self, domain: str, split: str) -> list[SplitEntry]:
        path = self.split_file(domain, split)
        return self.parsed(path)[0] if path.is_file() else []


def _images_under(d: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = [n for n in dirnames if not n.startswith(".")]
        out += [os.path.join(dirpath, n) for n in filenames if is_image_file(n)]
    return out
