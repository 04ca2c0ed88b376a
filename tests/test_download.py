"""`metaxl data download` end to end against a local HTTP server laid out like raw.githubusercontent.com."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import shutil
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import shared_data_or_skip

from metaxl import download as dl
from metaxl.cli import main
from metaxl.data import resolve_dataset
from metaxl.errors import DataError


class MirrorServer:
    """Serves ``root`` over HTTP with Range support; can cut a file short or corrupt it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: dict[str, list[int]] = {}  # path -> bytes to send before dying, one per request
        self.corrupt: set[str] = set()
        self.ignore_range = False
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                mirror.requests.append((self.path, self.headers.get("Range")))
                path = mirror.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                if self.path in mirror.corrupt:
                    body = body[:-1] + (b"X" if body[-1:] != b"X" else b"Y")
                start = 0
                ranged = self.headers.get("Range")
                if ranged and not mirror.ignore_range:
                    start = int(ranged.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cuts = mirror.cut_after.get(self.path)
                if cuts:
                    self.wfile.write(body[start : start + cuts.pop(0)])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)  # the server dies mid-file
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> MirrorServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


TOY_FILES = {"train.csv": 300_000, "valid.csv": 1_000, "test.csv": 70_000}


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A NusaX-like corpus with one language 'toy', its files and checksums; served by a mirror."""
    source = dl.SOURCES["nusax"]
    mirror_root = tmp_path / "mirror"
    lang_dir = mirror_root / source.repo / source.commit / source.path / "toy"
    lang_dir.mkdir(parents=True)
    files = {}
    for i, (name, size) in enumerate(TOY_FILES.items()):
        body = bytes((i * 7 + k * 31) % 251 for k in range(size))
        (lang_dir / name).write_bytes(body)
        files[f"toy/{name}"] = (size, hashlib.sha256(body).hexdigest())
    monkeypatch.setitem(dl.SOURCES, "nusax", dataclasses.replace(source, files=files))
    monkeypatch.delenv("METAXL_DATA", raising=False)
    monkeypatch.delenv(dl.URL_ENV, raising=False)
    with MirrorServer(mirror_root) as server:
        server.lang_dir = lang_dir  # type: ignore[attr-defined]
        server.rel = f"/{source.repo}/{source.commit}/{source.path}/toy"  # type: ignore[attr-defined]
        yield server


def fetch(server: MirrorServer, data: Path, **kw: object) -> str:
    out = io.StringIO()
    kw.setdefault("retries", 0)
    dl.download(["nusax:toy"], data, base_url=server.url, progress=False, retry_sleep_s=0, out=out, **kw)
    return out.getvalue()


def test_good_download_then_idempotent(toy, tmp_path):
    data = tmp_path / "data"
    text = fetch(toy, data)
    folder = data / "nusax-senti" / "toy"
    assert "nusax:toy" in text and "downloaded" in text and "CC BY-SA 4.0" in text
    for name in TOY_FILES:
        assert (folder / name).read_bytes() == (toy.lang_dir / name).read_bytes()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["toy"]  # no staging or partial files left
    n = len(toy.requests)
    assert n == 3 and all(r is None for _, r in toy.requests)
    text = fetch(toy, data)
    assert "up to date" in text and len(toy.requests) == n  # nothing fetched again


def test_checksum_mismatch_leaves_nothing(toy, tmp_path):
    data = tmp_path / "data"
    toy.corrupt.add(f"{toy.rel}/test.csv")
    with pytest.raises(DataError) as e:
        fetch(toy, data)
    msg = str(e.value)
    assert f"{toy.url}{toy.rel}/test.csv: checksum mismatch" in msg and "nothing was installed" in msg
    assert not (data / "nusax-senti" / "toy").exists()
    assert list((data / "nusax-senti").iterdir()) == []  # the staging folder is gone too


def test_server_dies_mid_file_then_the_rerun_resumes(toy, tmp_path):
    data = tmp_path / "data"
    train = f"{toy.rel}/train.csv"
    toy.cut_after[train] = [100_000]
    with pytest.raises(DataError, match=r"interrupted after 100000 of 300000 bytes .*run the same command again"):
        fetch(toy, data)
    assert not (data / "nusax-senti" / "toy").exists()  # nothing half-written in place
    fetch(toy, data)
    assert (data / "nusax-senti" / "toy" / "train.csv").read_bytes() == (toy.lang_dir / "train.csv").read_bytes()
    train_requests = [r for p, r in toy.requests if p == train]
    assert train_requests == [None, "bytes=100000-"]  # resumed, not restarted
    assert sum(1 for p, _ in toy.requests if p.endswith("test.csv")) == 1  # finished files not fetched again


def test_interruptions_are_retried_within_one_command(toy, tmp_path):
    train = f"{toy.rel}/train.csv"
    toy.cut_after[train] = [70_000, 50_000]
    fetch(toy, tmp_path / "data", retries=2)
    assert [r for p, r in toy.requests if p == train] == [None, "bytes=70000-", "bytes=120000-"]
    assert (tmp_path / "data" / "nusax-senti" / "toy" / "train.csv").stat().st_size == 300_000


def test_server_ignoring_range_restarts_the_file(toy, tmp_path):
    train = f"{toy.rel}/train.csv"
    toy.cut_after[train] = [70_000]
    toy.ignore_range = True
    fetch(toy, tmp_path / "data", retries=1)
    assert (tmp_path / "data" / "nusax-senti" / "toy" / "train.csv").read_bytes() == (toy.lang_dir / "train.csv").read_bytes()


def test_no_network_names_the_url(toy, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    base = f"http://127.0.0.1:{port}"
    with pytest.raises(DataError) as e:
        dl.download(["nusax:toy"], tmp_path / "data", base_url=base, progress=False, retries=1, retry_sleep_s=0,
                    out=io.StringIO())
    msg = str(e.value)
    assert msg.startswith(f"cannot download {base}{toy.rel}/") and "Connection refused" in msg.replace("Errno 111] ", "")
    assert dl.URL_ENV in msg
    assert list((tmp_path / "data" / "nusax-senti").iterdir()) == []  # no empty staging folder either


def test_http_404_is_a_clear_error(toy, tmp_path):
    (toy.lang_dir / "valid.csv").unlink()
    with pytest.raises(DataError, match=r"valid.csv: HTTP 404 .*METAXL_DATA_URL"):
        fetch(toy, tmp_path / "data")


def test_modified_local_file_needs_force(toy, tmp_path):
    data = tmp_path / "data"
    fetch(toy, data)
    edited = data / "nusax-senti" / "toy" / "valid.csv"
    edited.write_bytes(b"mine")
    with pytest.raises(DataError, match=r"valid.csv exists but is not the pinned version.*--force"):
        fetch(toy, data)
    assert edited.read_bytes() == b"mine"
    fetch(toy, data, force=True)
    assert edited.read_bytes() == (toy.lang_dir / "valid.csv").read_bytes()


def test_cli_uses_the_mirror_env_and_default_folder(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(dl.URL_ENV, toy.url + "/")
    monkeypatch.setenv("METAXL_CACHE", str(tmp_path / "cache"))
    assert main(["data", "download", "nusax:toy", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "cache" / "data") in out and "use the names as they are" in out
    elsewhere = tmp_path / "elsewhere"
    assert main(["data", "download", "nusax:toy", "--no-progress", "--data-dir", str(elsewhere)]) == 0
    assert f"pass --data-dir {elsewhere} (or set $METAXL_DATA={elsewhere}) to use them" in capsys.readouterr().out
    assert (tmp_path / "cache" / "data" / "nusax-senti" / "toy" / "train.csv").stat().st_size == 300_000


def test_cli_errors_are_one_line(capsys):
    assert main(["data", "download", "wikiann:qu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metaxl: error: cannot download 'wikiann:qu'") and err.count("\n") == 1
    assert main(["data", "download", "masakhaner2"]) == 2
    assert "name a language (masakhaner2:luo) or all" in capsys.readouterr().err
    assert main(["data", "download", "masakhaner2:xx"]) == 2
    assert "'xx' is not a language of MasakhaNER 2.0" in capsys.readouterr().err


def test_names_expand():
    assert dl.expand_names(["masakhaner2:all"]) == [f"masakhaner2:{x}" for x in dl.languages("masakhaner2")]
    assert len(dl.expand_names(["nusax"])) == 12 and dl.expand_names(["nusax:all"]) == dl.expand_names(["nusax"])
    assert len(dl.languages("masakhaner2")) == 40 and "ko" not in dl.languages("masakhaner2")
    for source in dl.SOURCES.values():
        for lang in source.languages():
            assert len(source.files_of(lang)) == 3, (source.corpus, lang)


def test_real_files_end_to_end(tmp_path, monkeypatch):
    """Real MasakhaNER 2.0 / NusaX files served as GitHub lays them out match the recorded checksums."""
    shared = shared_data_or_skip("masakhaner2", "luo").parents[1]
    shared_data_or_skip("nusax-senti", "balinese")
    mirror = tmp_path / "mirror"
    for corpus, lang in (("masakhaner2", "luo"), ("nusax", "balinese")):
        source = dl.SOURCES[corpus]
        dest = mirror / source.repo / source.commit / source.path / lang
        shutil.copytree(shared / source.folder / lang, dest)
    monkeypatch.delenv("METAXL_DATA", raising=False)
    with MirrorServer(mirror) as server:
        out = io.StringIO()
        folders = dl.download(["masakhaner2:luo", "nusax:ban"], tmp_path / "data", base_url=server.url,
                              progress=False, out=out)
    assert folders == [tmp_path / "data" / "masakhaner2" / "luo", tmp_path / "data" / "nusax-senti" / "balinese"]
    assert len(resolve_dataset("masakhaner2:luo", tmp_path / "data").load("train")) == 5161
    assert len(resolve_dataset("nusax:balinese", tmp_path / "data", sa_labels="3way").load("dev")) == 100


def test_recorded_checksums_match_the_shared_copies():
    shared = shared_data_or_skip("masakhaner2").parent
    for source in dl.SOURCES.values():
        for key, (size, sha) in source.files.items():
            path = shared / source.folder / key
            assert path.stat().st_size == size and hashlib.sha256(path.read_bytes()).hexdigest() == sha, key
