"""``python -m cwps_lightning.data download``: against a tiny DomainNet served on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cwps_lightning.data import download as download_module
from cwps_lightning.data.__main__ import main
from cwps_lightning.data.domainnet import DomainNetDataModule
from cwps_lightning.data.download import (
    DownloadError,
    extract_domain,
    fetch,
    parse_checksum,
    url_join,
)

from .helpers import REPO, make_domainnet, run_cli


class Handler(BaseHTTPRequestHandler):
    """Serves ``server.files`` with HTTP Range support, and can misbehave on request."""

    def do_GET(self):  # noqa: N802
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        if srv.fail_next:  # an overloaded server: an error status, once per code listed
            self.send_error(srv.fail_next.pop(0), "Unavailable")
            return
        if self.path in srv.hangup_once:  # hang up before any response
            srv.hangup_once.discard(self.path)
            self.close_connection = True
            return
        if srv.delay:  # a stalled server: silent, then it hangs up
            time.sleep(srv.delay)
            self.close_connection = True
            return
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if rng and not srv.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if srv.resume_at_zero:  # a partial response, but of the wrong bytes
                start = 0
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if self.path in srv.chunked_drop_once:  # chunked, hang up inside the one chunk
            srv.chunked_drop_once.discard(self.path)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.write(f"{len(body):x}\r\n".encode() + body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in srv.drop_once:  # send half, then hang up
            srv.drop_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.drop_once, srv.ignore_range = {}, [], set(), False
    srv.fail_next, srv.hangup_once, srv.chunked_drop_once = [], set(), set()
    srv.resume_at_zero, srv.delay = False, 0.0
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def publish(srv, tmp_path: Path, domains=("clipart",)) -> dict[str, bytes]:
    """Build a tiny DomainNet, zip each domain as the official archives are, serve it all."""
    staged = make_domainnet(tmp_path / "staged", domains=domains)
    for domain in domains:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for p in sorted((staged / domain).rglob("*")):
                zf.write(p, p.relative_to(staged).as_posix())
        archive = {"clipart": "groundtruth/clipart.zip", "painting": "groundtruth/painting.zip"}
        srv.files["/" + archive.get(domain, f"{domain}.zip")] = buf.getvalue()
        for split in ("train", "test"):
            name = f"{domain}_{split}.txt"
            srv.files[f"/domainnet/txt/{name}"] = (staged / name).read_bytes()
    return {"staged": staged}


def download(capsys, srv, root, *extra):
    code = main(["download", "+experiment=domainnet", f"data.root={root}",
                 f"data.download.base_url={srv.url}", "data.download.retry_wait=0", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def same_tree(a: Path, b: Path) -> bool:
    files_a = {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    return files_a == files_b and len(files_a) > 0


def test_download_extract_and_check(capsys, server, tmp_path):
    staged = publish(server, tmp_path, ("clipart", "sketch"))["staged"]
    root = tmp_path / "dn"
    code, out, err = download(capsys, server, root, "data.tasks=[clipart,sketch]")
    assert code == 0, err
    for domain in ("clipart", "sketch"):
        assert same_tree(root / domain, staged / domain)
        for split in ("train", "test"):
            assert (root / f"{domain}_{split}.txt").read_bytes() == \
                (staged / f"{domain}_{split}.txt").read_bytes()
    assert not any((root / ".downloads").iterdir())  # archives deleted after extracting
    assert not list(root.glob(".*.extracting"))
    digest = hashlib.sha256(server.files["/groundtruth/clipart.zip"]).hexdigest()
    assert f"sha256 {digest}  clipart.zip" in out
    # the downloaded tree is a valid DomainNet tree
    assert main(["check", "+experiment=domainnet", f"data.root={root}",
                 "data.tasks=[clipart,sketch]"]) == 0
    # a second run fetches nothing
    server.requests.clear()
    code, out, _ = download(capsys, server, root, "data.tasks=[clipart,sketch]")
    assert code == 0 and server.requests == []


def test_resumes_a_partial_download(capsys, server, tmp_path):
    staged = publish(server, tmp_path)["staged"]
    data = server.files["/groundtruth/clipart.zip"]
    root = tmp_path / "dn"
    part = root / ".downloads" / "clipart.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])  # an earlier run stopped after 1000 bytes
    code, out, err = download(capsys, server, root, "data.tasks=[clipart]",
                              "data.download.keep_archives=true")
    assert code == 0, err
    assert ("/groundtruth/clipart.zip", "bytes=1000-") in server.requests
    assert "resuming at 1,000 bytes" in out
    assert (root / ".downloads" / "clipart.zip").read_bytes() == data
    assert not part.exists()
    assert same_tree(root / "clipart", staged / "clipart")


def test_resumes_after_a_dropped_connection(capsys, server, tmp_path):
    publish(server, tmp_path)
    data = server.files["/groundtruth/clipart.zip"]
    server.drop_once.add("/groundtruth/clipart.zip")
    root = tmp_path / "dn"
    code, out, err = download(capsys, server, root, "data.tasks=[clipart]",
                              "data.download.keep_archives=true")
    assert code == 0, err
    zip_requests = [r for p, r in server.requests if p == "/groundtruth/clipart.zip"]
    assert zip_requests == [None, f"bytes={len(data) // 2}-"]
    assert (root / ".downloads" / "clipart.zip").read_bytes() == data


def test_server_ignoring_range_restarts(capsys, server, tmp_path):
    publish(server, tmp_path)
    data = server.files["/groundtruth/clipart.zip"]
    server.ignore_range = True
    root = tmp_path / "dn"
    part = root / ".downloads" / "clipart.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 500)  # would corrupt the file if appended to
    code, out, err = download(capsys, server, root, "data.tasks=[clipart]",
                              "data.download.keep_archives=true")
    assert code == 0, err
    assert "ignored the range request" in out
    assert (root / ".downloads" / "clipart.zip").read_bytes() == data


def test_checksums(capsys, server, tmp_path):
    publish(server, tmp_path)
    data = server.files["/groundtruth/clipart.zip"]
    good = hashlib.sha256(data).hexdigest()
    root = tmp_path / "bad"
    code, _, err = download(capsys, server, root, "data.tasks=[clipart]",
                            f"data.download.checksums={{clipart.zip: 'sha256:{'0' * 64}'}}")
    assert code == 2
    assert "checksum mismatch for clipart.zip" in err and good in err and "0" * 64 in err
    assert not (root / "clipart").exists()  # nothing extracted
    assert not list((root / ".downloads").glob("*"))  # the bad file is gone
    assert (root / "clipart_train.txt").is_file()  # (what was fetched stays)
    root = tmp_path / "good"
    md5 = hashlib.md5(data).hexdigest()
    code, _, err = download(capsys, server, root, "data.tasks=[clipart]",
                            f"data.download.checksums={{clipart.zip: 'md5:{md5}'}}")
    assert code == 0, err
    assert (root / "clipart").is_dir()


def test_parse_checksum():
    assert parse_checksum("a", "SHA256:" + "AB" * 32) == ("sha256", "ab" * 32)
    assert parse_checksum("a", "ab" * 16) == ("md5", "ab" * 16)
    with pytest.raises(DownloadError, match="expected 'sha256:<64 hex digits>'"):
        parse_checksum("a", "sha256:1234")


def test_bad_archives_leave_nothing_behind(capsys, server, tmp_path):
    publish(server, tmp_path)
    server.files["/groundtruth/clipart.zip"] = b"PK but not really a zip file" * 10
    root = tmp_path / "dn"
    code, _, err = download(capsys, server, root, "data.tasks=[clipart]")
    assert code == 2 and "is not a valid zip archive" in err
    assert not (root / "clipart").exists() and not list(root.glob(".*.extracting"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("sketch/apple/x.jpg", b"...")
    server.files["/groundtruth/clipart.zip"] = buf.getvalue()
    (root / ".downloads" / "clipart.zip").unlink()
    code, _, err = download(capsys, server, root, "data.tasks=[clipart]")
    assert code == 2 and "no top-level folder clipart/" in err
    assert not (root / "clipart").exists()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("clipart/../../evil.txt", b"...")
    server.files["/groundtruth/clipart.zip"] = buf.getvalue()
    (root / ".downloads" / "clipart.zip").unlink()
    code, _, err = download(capsys, server, root, "data.tasks=[clipart]")
    assert code == 2 and "unsafe member path" in err
    assert not (tmp_path / "evil.txt").exists()


def test_http_errors(capsys, server, tmp_path):
    code, _, err = download(capsys, server, tmp_path / "dn", "data.tasks=[clipart]")
    assert code == 2 and "HTTP 404" in err and "clipart_train.txt" in err
    # nothing listens on port 9 of 127.0.0.1: every attempt is refused. Nothing received:
    # the rerun fetches the file (no .part to resume from); part of it from an earlier run:
    # the rerun resumes there
    with pytest.raises(DownloadError, match=r"failed after 2 attempt.*; rerun the same command "
                                            r"to fetch it \(nothing of it was received\)$"):
        fetch("http://127.0.0.1:9/x.zip", tmp_path / "x.zip", retries=1, retry_wait=0,
              timeout=5, say=lambda m: None)
    assert not (tmp_path / "x.zip.part").exists()
    (tmp_path / "y.zip.part").write_bytes(b"x" * 1234)
    with pytest.raises(DownloadError, match=r"rerun the same command to resume from "
                                            r".*y\.zip\.part \(1,234 bytes\)$"):
        fetch("http://127.0.0.1:9/y.zip", tmp_path / "y.zip", retries=0, retry_wait=0,
              timeout=5, say=lambda m: None)


class MyDomainNet(DomainNetDataModule):
    """A user's DomainNet module under a name of its own."""


def test_a_domainnet_subclass_downloads(capsys, server, tmp_path):
    publish(server, tmp_path)
    code, _, err = download(capsys, server, tmp_path / "dn", "data.tasks=[clipart]",
                            f"data._target_={__name__}.MyDomainNet")
    assert code == 0, err
    assert (tmp_path / "dn" / "clipart").is_dir()


def test_download_is_for_domainnet_only(capsys, tmp_path):
    assert main(["download", "+experiment=imagenet_sketch", f"data.root={tmp_path}"]) == 2
    assert "DomainNet only" in capsys.readouterr().err
    # the default benchmark (digits) has no data.root key, and its data module no such
    # argument: that it is not DomainNet is said first, not how to add the key
    for root in (f"data.root={tmp_path}", f"+data.root={tmp_path}"):
        assert main(["download", root]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: download fetches DomainNet only (data=domainnet or "
                              "+experiment=domainnet), not DigitsDataModule;"), err
    # DomainNet's own key errors stay its own
    assert main(["download", "+experiment=domainnet", f"data.rooot={tmp_path}"]) == 2
    assert "did you mean data.root?" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_download_cli_subprocess(server, tmp_path):
    staged = publish(server, tmp_path)["staged"]
    data = server.files["/groundtruth/clipart.zip"]
    root = tmp_path / "dn"
    (root / ".downloads").mkdir(parents=True)
    (root / ".downloads" / "clipart.zip.part").write_bytes(data[:777])
    proc = run_cli("cwps_lightning.data", [
        "download", "+experiment=domainnet", f"data.root={root}", "data.tasks=[clipart]",
        f"data.download.base_url={server.url}"], cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert ("/groundtruth/clipart.zip", "bytes=777-") in server.requests
    assert same_tree(root / "clipart", staged / "clipart")


def test_refused_download_leaves_nothing_behind(capsys, tmp_path):
    """Every check comes before the root is made and before any network access (nothing
    listens on port 9 of 127.0.0.1: a download that got that far fails there)."""
    offline = ["data.download.base_url=http://127.0.0.1:9", "data.download.retries=0"]
    root = tmp_path / "dn"
    digest = "0" * 64
    refused = [
        (["data.tasks=[bogus]"], "unknown task(s) ['bogus']"),
        ([f"data.download.checksums={{clipart.zipp: 'sha256:{digest}'}}"],
         "data.download.checksums has key(s) ['clipart.zipp'] that name no file the download "
         "fetches; accepted: <domain>.zip, <domain>_train.txt and <domain>_test.txt, for a "
         "domain in clipart, infograph"),
        (["data.download.checksums={sketch.zip: 'sha256:12'}"],
         "data.download.checksums['sketch.zip'] = 'sha256:12': expected"),
    ]
    for extra, needle in refused:
        code = main(["download", "+experiment=domainnet", f"data.root={root}",
                     "data.tasks=[clipart]", *offline, *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: {needle}") and err.count("\n") == 1, err
        assert not root.exists()


def test_download_root_that_is_a_file(capsys, tmp_path):
    offline = ["data.download.base_url=http://127.0.0.1:9", "data.download.retries=0"]
    (tmp_path / "f").write_text("")
    for root, needle in ((tmp_path / "f", "is a file"),
                         (tmp_path / "f" / "dn", f"is under {tmp_path / 'f'}, a file")):
        code = main(["download", "+experiment=domainnet", f"data.root={root}", *offline])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"error: data.root='{root}' {needle}"), err
        assert err.count("\n") == 1


def test_checksums_for_domains_not_downloaded_are_kept(tmp_path):
    """A config may pin every domain's files and download a few of them."""
    from cwps_lightning.data.download import download_spec

    pins = {"sketch.zip": "md5:" + "a" * 32, "real_test.txt": "sha256:" + "b" * 64}
    assert download_spec({"checksums": pins})["checksums"] == pins


@pytest.mark.parametrize(("download", "needle"), [
    ({"retry": 3}, "data.download has unknown key(s) ['retry']; accepted: "),
    ({"retries": "many"}, "data.download.retries must be an integer >= 0, got 'many'"),
    ({"timeout": 0}, "data.download.timeout must be a number of seconds > 0, got 0"),
    ({"split_files": "txt/{domian}_{split}.txt"}, "only the fields {domain} and {split}"),
    ({"archives": ["real.zip"]}, "data.download.archives must be a mapping by domain"),
    ({"keep_archives": "yes"}, "data.download.keep_archives must be true or false"),
    ({"checksums": ["clipart.zip"]}, "data.download.checksums must be a mapping by file name"),
    ({"base_url": ""}, "data.download.base_url must be a non-empty string, got ''"),
    ({"split_files": "txt/{}_{}.txt"}, "only the fields {domain} and {split}"),
    ({"retries": -1}, "data.download.retries must be an integer >= 0, got -1"),
    ({"retry_wait": -1}, "data.download.retry_wait must be a number of seconds >= 0, got -1"),
    ({"timeout": True}, "data.download.timeout must be a number of seconds > 0, got True"),
    ({"timeout": float("nan")}, "data.download.timeout must be a number of seconds > 0, got nan"),
    ({"retry_wait": float("inf")}, "data.download.retry_wait must be a number of seconds >= 0"),
    ({"archives": {"clipart": 3}}, "data.download.archives.clipart must be a path under "
                                   "base_url (a non-empty string), got 3"),
    ({"archives": {"sketch": ""}}, "data.download.archives.sketch must be a path"),
    ({"archives": {"clipArt": "c.zip"}}, "data.download.archives has key(s) ['clipArt'] that "
                                         "are no DomainNet domain; accepted: clipart, "),
])
def test_bad_download_settings_are_named(tmp_path, download, needle):
    from cwps_lightning.data import DomainNetDataModule
    from cwps_lightning.data.download import download_domainnet

    # (a setting let through fails fast at a closed local port, not at the real server)
    download = {"base_url": "http://127.0.0.1:9", "retries": 0, "retry_wait": 0, **download}
    dm = DomainNetDataModule(root=str(tmp_path / "dn"), download=download, tasks=["clipart"])
    with pytest.raises(DownloadError) as err:
        download_domainnet(dm, say=lambda m: None)
    assert needle in str(err.value)


def test_download_setting_that_is_not_a_mapping(tmp_path):
    from cwps_lightning.data import DataConfigError, DomainNetDataModule

    dm = DomainNetDataModule(root=str(tmp_path), download="yes")
    with pytest.raises(DataConfigError, match="data.download must be a mapping .* got 'yes'"):
        _ = dm.task_names


def test_parse_checksum_takes_every_listed_algorithm_and_refuses_bad_digests():
    assert parse_checksum("a", "ab" * 64) == ("sha512", "ab" * 64)  # a bare digest, by length
    assert parse_checksum("a", "ab" * 20) == ("sha1", "ab" * 20)
    for bad in ("sha256:" + "a" * 65, "md5:" + "a" * 31 + "g", "sha1:" + "z" * 40):
        with pytest.raises(DownloadError, match=r"checksums\['clipart.zip'\] = .*expected"):
            parse_checksum("clipart.zip", bad)


def zip_requests(srv, path="/groundtruth/clipart.zip") -> list:
    return [r for p, r in srv.requests if p == path]


def test_a_complete_part_file_is_not_fetched_again(capsys, server, tmp_path):
    """An earlier run stopped after the last byte, before the rename: the server answers the
    range past the end with 416, and the part file is taken as it is."""
    publish(server, tmp_path)
    data = server.files["/groundtruth/clipart.zip"]
    root = tmp_path / "dn"
    part = root / ".downloads" / "clipart.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data)
    code, _, err = download(capsys, server, root, "data.tasks=[clipart]",
                            "data.download.keep_archives=true")
    assert code == 0, err
    assert zip_requests(server) == [f"bytes={len(data)}-"]
    assert (root / ".downloads" / "clipart.zip").read_bytes() == data
    assert (root / "clipart").is_dir()


def test_a_part_file_longer_than_the_file_starts_again(capsys, server, tmp_path):
    publish(server, tmp_path)
    data = server.files["/groundtruth/clipart.zip"]
    root = tmp_path / "dn"
    part = root / ".downloads" / "clipart.zip.part"
    part.parent.mkdir(parents=True)
    longer = data + b"left over from another file"
    part.write_bytes(longer)
    code, _, err = download(capsys, server, root, "data.tasks=[clipart]",
                            "data.download.keep_archives=true")
    assert code == 0, err
    assert zip_requests(server) == [f"bytes={len(longer)}-", None]
    assert (root / ".downloads" / "clipart.zip").read_bytes() == data


def test_a_server_resuming_at_the_wrong_byte_starts_again(server, tmp_path):
    data = bytes(range(256)) * 20
    server.files["/x.zip"] = data
    server.resume_at_zero = True
    dest = tmp_path / "x.zip"
    dest.with_name("x.zip.part").write_bytes(data[:1000])
    said = []
    fetch(f"{server.url}/x.zip", dest, retries=1, retry_wait=0, say=said.append)
    assert dest.read_bytes() == data  # not the whole file appended to its first 1000 bytes
    assert zip_requests(server, "/x.zip") == ["bytes=1000-", None]
    assert any("not 1000; starting again" in line for line in said), said


def test_server_errors_are_retried_after_growing_waits(server, tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(download_module.time, "sleep", waits.append)
    data = b"payload" * 100
    server.files["/x.zip"] = data
    server.fail_next = [500, 503, 429]
    dest = fetch(f"{server.url}/x.zip", tmp_path / "x.zip", retries=3, retry_wait=1.5,
                 say=lambda m: None)
    assert dest.read_bytes() == data and len(server.requests) == 4
    assert waits == [1.5, 3.0, 6.0]  # doubling
    waits.clear()
    server.fail_next = [503, 503]
    fetch(f"{server.url}/x.zip", tmp_path / "y.zip", retries=2, retry_wait=40, say=lambda m: None)
    assert waits == [40, 60]  # at most a minute


def test_a_missing_file_is_not_asked_for_again(server, tmp_path):
    dest = tmp_path / "x.zip"
    with pytest.raises(DownloadError) as err:
        fetch(f"{server.url}/x.zip", dest, retries=3, retry_wait=0, say=lambda m: None)
    assert str(err.value) == f"{server.url}/x.zip: HTTP 404 Not Found"
    assert len(server.requests) == 1
    assert not dest.exists() and not dest.with_name("x.zip.part").exists()


@pytest.mark.parametrize("cut", ["hangup_once", "chunked_drop_once"])
def test_a_connection_lost_in_any_way_is_retried(server, tmp_path, cut):
    """Hung up before the response, or inside a chunked body: both are tried again."""
    data = bytes(range(256)) * 20
    server.files["/x.zip"] = data
    getattr(server, cut).add("/x.zip")
    said = []
    dest = fetch(f"{server.url}/x.zip", tmp_path / "x.zip", retries=1, retry_wait=0,
                 say=said.append)
    assert dest.read_bytes() == data
    assert len(server.requests) == 2 and any("retrying (1/1)" in line for line in said), said


def test_a_slow_server_times_out_as_configured(capsys, server, tmp_path):
    publish(server, tmp_path)
    server.delay = 1.5
    code, _, err = download(capsys, server, tmp_path / "dn", "data.tasks=[clipart]",
                            "data.download.timeout=0.2", "data.download.retries=0")
    assert code == 2 and "failed after 1 attempt(s)" in err and "timed out" in err, err


def test_an_existing_file_is_verified_against_its_checksum(tmp_path):
    """(nothing listens on port 9 of 127.0.0.1: a file fetched again would fail there)"""
    dest = tmp_path / "clipart_train.txt"
    dest.write_bytes(b"edited by hand")
    pinned = "sha256:" + hashlib.sha256(b"as published").hexdigest()
    with pytest.raises(DownloadError, match="checksum mismatch for the existing .*clipart_train"):
        fetch("http://127.0.0.1:9/x.txt", dest, pinned, retries=0, say=lambda m: None)
    assert dest.read_bytes() == b"edited by hand"  # left for the user to look at
    matching = "md5:" + hashlib.md5(b"edited by hand").hexdigest()
    assert fetch("http://127.0.0.1:9/x.txt", dest, matching, retries=0, say=lambda m: None) == dest


def test_split_file_checksums_are_verified(capsys, server, tmp_path):
    publish(server, tmp_path)
    root = tmp_path / "dn"
    code, _, err = download(capsys, server, root, "data.tasks=[clipart]",
                            f"data.download.checksums={{clipart_test.txt: 'sha256:{'0' * 64}'}}")
    assert code == 2 and "checksum mismatch for clipart_test.txt" in err, err
    assert not (root / "clipart_test.txt").exists() and not (root / "clipart").exists()


def zip_of(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(name, b"...")
    return path


@pytest.mark.parametrize("unsafe", ["/clipart/evil.jpg", "clipart\\apple\\..\\..\\..\\evil.jpg"])
def test_archives_with_absolute_or_backslash_paths_are_refused(tmp_path, unsafe):
    archive = zip_of(tmp_path / "clipart.zip", ["clipart/apple/a.jpg", unsafe])
    root = tmp_path / "dn"
    root.mkdir()
    with pytest.raises(DownloadError, match="unsafe member path"):
        extract_domain(archive, root, "clipart", say=lambda m: None)
    assert list(root.iterdir()) == []


def test_extraction_leaves_out_what_an_interrupted_one_left(tmp_path):
    archive = zip_of(tmp_path / "clipart.zip", ["clipart/apple/a.jpg"])
    root = tmp_path / "dn"
    (root / ".clipart.extracting" / "clipart" / "bee").mkdir(parents=True)
    (root / ".clipart.extracting" / "clipart" / "bee" / "stale.jpg").write_bytes(b"...")
    extract_domain(archive, root, "clipart", say=lambda m: None)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "clipart/apple/a.jpg"]


@pytest.mark.parametrize("base", ["http://mirror.example/dn", "http://mirror.example/dn/"])
@pytest.mark.parametrize("rel", ["groundtruth/clipart.zip", "/groundtruth/clipart.zip"])
def test_archive_urls_join_the_base_url_with_one_slash(base, rel):
    assert url_join(base, rel) == "http://mirror.example/dn/groundtruth/clipart.zip"


def test_an_archive_given_for_one_domain_leaves_the_others_at_their_defaults(server, tmp_path):
    from cwps_lightning.data import DomainNetDataModule
    from cwps_lightning.data.download import download_domainnet

    staged = publish(server, tmp_path, ("clipart", "sketch"))["staged"]
    server.files["/mirror/clipart.zip"] = server.files.pop("/groundtruth/clipart.zip")
    root = tmp_path / "dn"
    dm = DomainNetDataModule(root=str(root), tasks=["clipart", "sketch"], download={
        "base_url": server.url, "retry_wait": 0, "archives": {"clipart": "mirror/clipart.zip"}})
    assert download_domainnet(dm, say=lambda m: None) == ["clipart", "sketch"]
    assert same_tree(root / "clipart", staged / "clipart")
    assert same_tree(root / "sketch", staged / "sketch")


def test_a_domain_without_an_archive_is_named(capsys, server, tmp_path):
    publish(server, tmp_path, ("real",))
    code, _, err = download(capsys, server, tmp_path / "dn", "data.tasks=[real]",
                            "data.download.archives={real: null}")
    assert code == 2 and "data.download.archives has no entry for 'real'" in err, err


def test_a_bad_archive_entry_is_named_before_anything_is_fetched(capsys, server, tmp_path):
    publish(server, tmp_path)
    code, _, err = download(capsys, server, tmp_path / "dn", "data.tasks=[clipart]",
                            "data.download.archives={clipart: 3}")
    assert code == 2 and "data.download.archives.clipart must be a path" in err, err
    assert server.requests == []


def test_a_file_where_a_domain_folder_goes_is_refused_before_fetching(capsys, server, tmp_path):
    publish(server, tmp_path)
    root = tmp_path / "dn"
    root.mkdir()
    (root / "clipart").write_text("not a folder")
    code, _, err = download(capsys, server, root, "data.tasks=[clipart]")
    assert code == 2 and f"{root / 'clipart'}: a file where a domain's folder goes" in err, err
    assert server.requests == []
    assert (root / "clipart").read_text() == "not a folder"


def test_an_interrupted_download_keeps_its_part_and_exits_130(capsys, server, tmp_path,
                                                             monkeypatch):
    publish(server, tmp_path)
    data = server.files["/groundtruth/clipart.zip"]
    root = tmp_path / "dn"
    part = root / ".downloads" / "clipart.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])

    def ctrl_c(request, timeout):
        raise KeyboardInterrupt

    monkeypatch.setattr(download_module, "urlopen", ctrl_c)
    code, _, err = download(capsys, server, root, "data.tasks=[clipart]")
    assert code == 130
    assert err == "error: interrupted (a partial download resumes when you rerun the command)\n"
    assert part.read_bytes() == data[:1000]


@pytest.mark.parametrize("code", ["EAI_NONAME", "EAI_AGAIN"])
def test_a_host_that_does_not_resolve_stops_at_once(tmp_path, monkeypatch, code):
    """Offline, every retry failed alike: five of them waited a minute before the error."""
    import socket
    from urllib.error import URLError

    def no_dns(request, timeout):
        raise URLError(socket.gaierror(getattr(socket, code), "name resolution failed"))

    monkeypatch.setattr(download_module, "urlopen", no_dns)
    monkeypatch.setattr(download_module.time, "sleep", lambda s: pytest.fail("waited to retry"))
    dest = tmp_path / "x.zip"
    dest.with_name("x.zip.part").write_bytes(b"12345")  # what an earlier run fetched stays
    with pytest.raises(DownloadError) as err:
        fetch("http://example.invalid/d/x.zip", dest, retries=5, say=lambda m: None)
    assert "cannot resolve the host 'example.invalid' (name resolution failed)" in str(err.value)
    assert "resumes from" in str(err.value) and "(5 bytes)" in str(err.value)
    assert dest.with_name("x.zip.part").read_bytes() == b"12345" and not dest.exists()


def test_a_download_that_fetched_nothing_leaves_no_root_behind(capsys, tmp_path, monkeypatch):
    """(a root it did not make, and one holding what it fetched, stay)"""
    import socket
    from urllib.error import URLError

    def no_dns(request, timeout):
        raise URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    monkeypatch.setattr(download_module, "urlopen", no_dns)
    args = ["download", "+experiment=domainnet", "data.tasks=[clipart]"]
    root = tmp_path / "a" / "dn"
    code = main([*args, f"data.root={root}"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot resolve the host 'csr.bu.edu'" in err and "tries again" in err
    assert list(tmp_path.iterdir()) == []  # neither dn nor the a/ made for it
    kept = tmp_path / "kept"
    kept.mkdir()
    assert main([*args, f"data.root={kept}"]) == 2 and kept.is_dir()
    partial = tmp_path / "partial"
    (partial / ".downloads").mkdir(parents=True)
    (partial / ".downloads" / "clipart.zip.part").write_bytes(b"PK")
    assert main([*args, f"data.root={partial}"]) == 2
    assert (partial / ".downloads" / "clipart.zip.part").read_bytes() == b"PK"


def test_a_host_that_stops_resolving_after_a_lost_connection_is_retried(tmp_path, monkeypatch):
    """(a network that drops for a moment in a long download: the retries carry it through)"""
    import socket
    from urllib.error import URLError

    calls = []
    real = download_module.urlopen

    def flaky(request, timeout):
        calls.append(request.full_url)
        if len(calls) == 1:
            raise ConnectionResetError("reset")
        if len(calls) == 2:
            raise URLError(socket.gaierror(socket.EAI_AGAIN, "Temporary failure"))
        return real(request, timeout=timeout)

    monkeypatch.setattr(download_module, "urlopen", flaky)
    monkeypatch.setattr(download_module.time, "sleep", lambda s: None)
    said = []
    with pytest.raises(DownloadError, match=r"failed after 3 attempt\(s\)"):
        # (the third attempt goes to a port where nothing listens)
        fetch("http://127.0.0.1:9/x.zip", tmp_path / "x.zip", retries=2, say=said.append)
    assert len(calls) == 3 and any("cannot resolve" in line for line in said), said
