"""``python -m cwps_lightning.data download +experiment=domainnet data.root=<dir>``: fetch
DomainNet's official archives and split files, resume interrupted downloads, extract.

For every domain in ``data.tasks`` (default: all six):

1. ``<domain>_train.txt`` and ``<domain>_test.txt`` are fetched into ``<root>``;
2. the image archive is fetched into ``<root>/.downloads/<domain>.zip``, through
   ``<domain>.zip.part``: an interrupted download (this run's dropped connection, or an earlier
   run stopped by Ctrl-C) continues from where it stopped with an HTTP ``Range`` request; a
   server that ignores the range is answered by starting again;
3. a checksum is verified where ``data.download.checksums`` gives one (``sha256:<hex>`` or
   ``md5:<hex>`` per file name); a mismatching file is deleted, nothing is extracted;
4. the archive is extracted into a temporary folder and moved to ``<root>/<domain>`` only
   when complete, so ``<root>/<domain>`` is never half-written; the archive is then deleted
   (unless ``data.download.keep_archives=true``).

A domain whose folder already exists is skipped; a finished file is not fetched again. The
command prints the sha256 of every file it fetched, to pin them in the config.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import socket
import sys
import time
import zipfile
from collections.abc import Callable, Mapping
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from urllib.error import HTTPError, URLError
from urllib.parse import urlsplit
from urllib.request import Request, urlopen

from ..errors import ConfigError
from ..fs import file_in_the_way
from .base import DataConfigError
from .domainnet import DOMAINS, DomainNetDataModule

#: the official DomainNet release (http://ai.bu.edu/M3SDA/), cleaned version
DEFAULT_SPEC = {
    "base_url": "http://csr.bu.edu/ftp/visda/2019/multi-source",
    "archives": {
        "clipart": "groundtruth/clipart.zip",
        "infograph": "infograph.zip",
        "painting": "groundtruth/painting.zip",
        "quickdraw": "quickdraw.zip",
        "real": "real.zip",
        "sketch": "sketch.zip",
    },
    "split_files": "domainnet/txt/{domain}_{split}.txt",
    # No checksum is published with the release; add verified ones as
    # {"clipart.zip": "sha256:<hex>", "clipart_train.txt": "md5:<hex>", ...}.
    "checksums": {},
    "keep_archives": False,
    "retries": 5,
    "timeout": 60,
    "retry_wait": 2.0,
}
ALGORITHMS = {"sha256": 64, "md5": 32, "sha512": 128, "sha1": 40}
CHUNK = 1 << 20


class DownloadError(DataConfigError):
    """A download or extraction that failed; the message says what and how to go on."""


class _Retry(Exception):
    """A transient failure: try again (resuming)."""


class _NoHost(_Retry):
    """The host name did not resolve: transient after a connection was lost, but where the
    first request of a file meets it, no network (or a wrong address) is the likely cause."""


def parse_checksum(name: str, spec: str) -> tuple[str, str]:
    """``"sha256:<hex>"`` (or ``md5:``, ``sha512:``, ``sha1:``) -> (algorithm, hex digest)."""
    text = str(spec).strip().lower()
    algo, sep, digest = text.partition(":")
    if not sep:
        algo, digest = {64: "sha256", 32: "md5", 128: "sha512", 40: "sha1"}.get(
            len(text), "?"), text
    if algo not in ALGORITHMS or len(digest) != ALGORITHMS[algo] or not re.fullmatch(
            r"[0-9a-f]+", digest):
        raise DownloadError(f"data.download.checksums[{name!r}] = {spec!r}: expected "
                            f"'sha256:<64 hex digits>' or 'md5:<32 hex digits>'")
    return algo, digest


def file_digest(path: Path, algo: str = "sha256") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` -> (100, 1000); ``bytes */1000`` -> (None, 1000)."""
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _fetch_once(url: str, part: Path, timeout: float, say: Callable[[str], None]) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "cwps-lightning-downloader"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urlopen(Request(url, headers=headers), timeout=timeout)  # noqa: S310
    except HTTPError as err:
        if err.code == 416 and have:
            _, total = _content_range(err.headers.get("Content-Range"))
            if total == have:
                return  # the part file is already complete
            part.unlink()
            raise _Retry(f"server refused to resume at byte {have}; starting again") from err
        if 500 <= err.code < 600 or err.code == 429:
            raise _Retry(f"HTTP {err.code} {err.reason}") from err
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from err
    except (URLError, OSError, HTTPException) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, socket.gaierror):
            raise _NoHost(f"cannot resolve the host {urlsplit(url).hostname!r} "
                          f"({reason.strerror})") from err
        raise _Retry(f"{type(err).__name__}: {reason}") from err
    with resp:
        total = None
        if have and resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            if start != have:
                part.unlink()
                raise _Retry(f"server resumed at byte {start}, not {have}; starting again")
            mode = "ab"
            say(f"  resuming at {have:,} bytes")
        else:
            if have:
                say("  the server ignored the range request; starting again")
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        done, next_note, last_note = have, 0.1, time.time()
        try:
            with open(part, mode) as f:
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    done += len(block)
                    if total and (done / total >= next_note or time.time() - last_note > 30):
                        say(f"  {100 * done / total:5.1f}%  {done:,} / {total:,} bytes")
                        next_note = done / total + 0.1
                        last_note = time.time()
        except (OSError, HTTPException) as err:  # a dropped connection: resume next attempt
            raise _Retry(f"connection lost at {done:,} bytes ({type(err).__name__})") from err
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Retry(f"connection closed at {size:,} of {total:,} bytes")


def fetch(
    url: str, dest: Path, checksum: str | None = None, retries: int = 5, timeout: float = 60,
    retry_wait: float = 2.0, say: Callable[[str], None] = print,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part`` (resumed across attempts and runs)."""
    expected = parse_checksum(dest.name, checksum) if checksum else None
    if dest.exists():
        if expected is not None:
            algo, want = expected
            got = file_digest(dest, algo)
            if got != want:
                raise DownloadError(f"checksum mismatch for the existing {dest}: expected {algo} "
                                    f"{want}, got {got}; delete it and rerun to fetch it again")
        say(f"have {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    say(f"fetching {url} -> {dest}")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout, say)
            break
        except _Retry as err:
            have = part.stat().st_size if part.exists() else 0
            if isinstance(err, _NoHost) and attempt == 0:
                # offline every retry fails alike (five of them waited a minute); a resolver
                # that fails for a moment is one rerun away (the part file resumes)
                again = f"resumes from {part} ({have:,} bytes)" if have else "tries again"
                raise DownloadError(f"{url}: {err}: no network on this machine, or a wrong "
                                    f"data.download.base_url; the same command {again}") from err
            if attempt == retries:
                # (nothing fetched, nothing to resume: the rerun starts the file again)
                again = (f"resume from {part} ({have:,} bytes)" if have
                         else "fetch it (nothing of it was received)")
                raise DownloadError(f"downloading {url} failed after {retries + 1} attempt(s): "
                                    f"{err}; rerun the same command to {again}") from err
            say(f"  {err}; retrying ({attempt + 1}/{retries}), resuming at {have:,} bytes")
            time.sleep(min(retry_wait * 2**attempt, 60))
    digest = file_digest(part, "sha256")
    if expected is not None:
        algo, want = expected
        got = digest if algo == "sha256" else file_digest(part, algo)
        if got != want:
            part.unlink()
            raise DownloadError(f"checksum mismatch for {dest.name} from {url}: expected {algo} "
                                f"{want}, got {got}; the file was deleted, rerun to fetch it again")
    os.replace(part, dest)
    say(f"  sha256 {digest}  {dest.name}")
    return dest


def extract_domain(archive: Path, root: Path, domain: str, say: Callable[[str], None] = print):
    """Extract ``archive`` (holding ``<domain>/...``) to ``root/<domain>``, all or nothing."""
    target = root / domain
    tmp = root / f".{domain}.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"extracting {archive} -> {target}")
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                p = PurePosixPath(member.filename)
                if p.is_absolute() or ".." in p.parts or "\\" in member.filename:
                    raise DownloadError(f"{archive}: unsafe member path {member.filename!r}")
            tops = {PurePosixPath(m.filename).parts[0] for m in zf.infolist() if m.filename}
            if domain not in tops:
                raise DownloadError(f"{archive} has no top-level folder {domain}/ (it holds "
                                    f"{sorted(tops)[:5]}): not a DomainNet {domain} archive")
            zf.extractall(tmp)
        os.replace(tmp / domain, target)
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{archive} is not a valid zip archive ({err}); delete it and rerun "
                            f"to fetch it again") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def url_join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel.lstrip("/")


def download_spec(overrides: Mapping | None) -> dict:
    """DEFAULT_SPEC updated by ``data.download``, checked before anything is fetched."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEFAULT_SPEC))
    if unknown:
        raise DownloadError(f"data.download has unknown key(s) {unknown}; accepted: "
                            f"{sorted(DEFAULT_SPEC)}")
    spec = {**DEFAULT_SPEC, **overrides}
    for key in ("archives", "checksums"):
        if spec[key] is not None and not isinstance(spec[key], Mapping):
            raise DownloadError(f"data.download.{key} must be a mapping by "
                                f"{'domain' if key == 'archives' else 'file name'} (or null), "
                                f"got {spec[key]!r}")
    spec["archives"] = {**DEFAULT_SPEC["archives"], **dict(spec["archives"] or {})}
    check_archives(spec["archives"])
    spec["checksums"] = dict(spec["checksums"] or {})
    check_download_settings(spec)
    check_checksums(spec["checksums"])
    return spec


def check_archives(archives: Mapping) -> None:
    """Every key a DomainNet domain, every value a path under base_url (all domains: checked
    before the first byte is fetched, not when a domain's turn comes)."""
    unknown = sorted(str(d) for d in archives if d not in DOMAINS)
    if unknown:
        raise DownloadError(f"data.download.archives has key(s) {unknown} that are no DomainNet "
                            f"domain; accepted: {', '.join(DOMAINS)}")
    for domain, rel in archives.items():
        if rel is None:
            raise DownloadError(f"data.download.archives has no entry for {domain!r} (null)")
        if not isinstance(rel, str) or not rel.strip("/ "):
            raise DownloadError(f"data.download.archives.{domain} must be a path under base_url "
                                f"(a non-empty string), got {rel!r}")


def check_checksums(checksums: Mapping) -> None:
    """Every key names a file a download fetches (a misspelt one would verify nothing) and
    every value is a digest, before the first byte is fetched."""
    accepted = {f"{d}{end}" for d in DOMAINS for end in (".zip", "_train.txt", "_test.txt")}
    unknown = sorted(str(k) for k in checksums if k not in accepted)
    if unknown:
        raise DownloadError(f"data.download.checksums has key(s) {unknown} that name no file "
                            f"the download fetches; accepted: <domain>.zip, <domain>_train.txt "
                            f"and <domain>_test.txt, for a domain in {', '.join(DOMAINS)}")
    for name, value in checksums.items():
        if value is not None:
            parse_checksum(name, value)


def check_download_settings(spec: Mapping) -> None:
    """The scalar settings of a download spec; a DownloadError names the bad one."""
    def bad(key: str, accepted: str) -> DownloadError:
        return DownloadError(f"data.download.{key} must be {accepted}, got {spec[key]!r}")

    def is_number(value) -> bool:  # (finite: a NaN timeout would reach the socket)
        return isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value)

    for key in ("base_url", "split_files"):
        if not isinstance(spec[key], str) or not spec[key]:
            raise bad(key, "a non-empty string")
    try:
        spec["split_files"].format(domain="clipart", split="train")
    except (KeyError, IndexError, ValueError) as err:
        raise bad("split_files", "a path with only the fields {domain} and {split}") from err
    if not isinstance(spec["retries"], int) or isinstance(spec["retries"], bool) \
            or spec["retries"] < 0:
        raise bad("retries", "an integer >= 0")
    if not is_number(spec["timeout"]) or spec["timeout"] <= 0:
        raise bad("timeout", "a number of seconds > 0")
    if not is_number(spec["retry_wait"]) or spec["retry_wait"] < 0:
        raise bad("retry_wait", "a number of seconds >= 0")
    if not isinstance(spec["keep_archives"], bool):
        raise bad("keep_archives", "true or false")


def download_domainnet(dm, say: Callable[[str], None] = print) -> list[str]:
    """Fetch and extract the domains ``dm`` (a DomainNetDataModule) asks for."""
    spec = download_spec(dm.download)
    root = dm.root
    if root is None:
        raise DataConfigError("data.root is not set: say where DomainNet should go")
    dm.validate_tasks()
    # made only once everything is checked: a refused command leaves no empty root behind
    there = file_in_the_way(root)
    if there is not None:  # it, or a folder above it, is a file
        what = "is a file" if there == root else f"is under {there}, a file"
        raise DownloadError(f"data.root={str(root)!r} {what}; point it at the folder DomainNet "
                            f"should go to (made if missing)")
    # a file where a domain's folder goes would fail the extraction after the whole download
    in_the_way = [str(root / d) for d in dm.tasks_requested if file_in_the_way(root / d)]
    if in_the_way:
        raise DownloadError(f"{', '.join(in_the_way)}: a file where a domain's folder goes; "
                            f"move it away and rerun")
    made = [d for d in (root, *root.parents) if not d.exists()]  # (deepest first)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # (no permission)
        raise DownloadError(f"data.root={str(root)!r} cannot be made: {err.strerror} "
                            f"({err.filename})") from None
    try:
        _fetch_and_extract(dm, spec, root, say)
    except BaseException:
        # a download that fetched nothing (no network) leaves no empty folders behind; a
        # part file, a split file or a domain stays, and the rerun goes on from it
        for folder in [root / ".downloads", *made]:
            try:
                folder.rmdir()
            except OSError:  # not empty (or not there)
                if folder != root / ".downloads":
                    break
        raise
    say(f"done: {root} has {list(dm.tasks_requested)}; verify with `python -m cwps_lightning.data "
        f"check +experiment=domainnet data.root={root}`")
    return list(dm.tasks_requested)


def _fetch_and_extract(dm, spec: dict, root: Path, say: Callable[[str], None]) -> None:
    kw = dict(retries=int(spec["retries"]), timeout=float(spec["timeout"]),
              retry_wait=float(spec["retry_wait"]), say=say)
    for domain in dm.tasks_requested:
        for split in ("train", "test"):
            name = f"{domain}_{split}.txt"
            rel = spec["split_files"].format(domain=domain, split=split)
            fetch(url_join(spec["base_url"], rel), root / name, spec["checksums"].get(name), **kw)
        if (root / domain).is_dir():
            say(f"have {root / domain}/ (delete it to extract again)")
            continue
        archive = root / ".downloads" / f"{domain}.zip"
        fetch(url_join(spec["base_url"], spec["archives"][domain]), archive,
              spec["checksums"].get(f"{domain}.zip"), **kw)
        extract_domain(archive, root, domain, say)
        if not spec["keep_archives"]:
            archive.unlink()


def run_download(overrides, stream=None) -> int:
    from ..config import compose_config, instantiate_data

    stream = stream or sys.stdout

    def say(msg: str) -> None:
        print(msg, file=stream, flush=True)

    def not_domainnet(name: str) -> DataConfigError:
        return DataConfigError(
            f"download fetches DomainNet only (data=domainnet or +experiment=domainnet), not "
            f"{name}; ImageNet-to-Sketch is distributed by the Piggyback / PackNet authors: "
            f"unpack it as docs/datasets.md describes"
        )

    # Another benchmark is the thing to say, before its data.* keys are (data.root is no key
    # of the default, digits, and no argument of its data module)
    try:
        cfg = compose_config(overrides)
    except ConfigError:
        other = _other_benchmark([o for o in overrides
                                  if not o.lstrip("+~").startswith("data.")])
        if other is not None:
            raise not_domainnet(other) from None
        raise
    other = _other_benchmark(cfg)
    if other is not None:
        raise not_domainnet(other)
    dm = instantiate_data(cfg)
    if not isinstance(dm, DomainNetDataModule):  # (what a factory function made)
        raise not_domainnet(type(dm).__name__)
    download_domainnet(dm, say)
    return 0


def _other_benchmark(cfg_or_overrides) -> str | None:
    """The class name where a config's data._target_ (a config, or the overrides to compose
    one) is a class other than DomainNetDataModule or a subclass; None otherwise, and where
    the overrides do not compose or the target is a factory function (judged by what it
    makes)."""
    from ..config import compose_config, locate

    cfg = cfg_or_overrides
    if isinstance(cfg, list):
        try:
            cfg = compose_config(cfg)
        except ConfigError:
            return None
    made_by = locate(cfg.data.get("_target_"))
    if isinstance(made_by, type) and not issubclass(made_by, DomainNetDataModule):
        return made_by.__name__
    return None
