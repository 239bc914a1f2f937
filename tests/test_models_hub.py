"""``hctembed models`` and ``hctembed models pull`` against a loopback imitation of the Hugging Face Hub.

The fake Hub answers ``HEAD``/``GET /{repo}/resolve/{revision}/{filename}`` as the Hub does for an LFS file:
a 302 to a storage host (here a second loopback server, so huggingface_hub does not follow it) carrying
``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``; the storage server serves the bytes,
with ``Range`` (206). ``redirect=False`` serves the bytes from ``/resolve`` itself. huggingface_hub reads
``HF_ENDPOINT``/``HF_HOME``/``HF_HUB_OFFLINE`` at import, so the CLI runs in a subprocess with its own env.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from typer.testing import CliRunner

from hctembed.cli.app import app
from hctembed.model.catalogue import CATALOGUE, vit_params

REPO_ROOT = Path(__file__).resolve().parents[1]
CTFM_REPO = "project-lighter/ct_fm_feature_extractor"
CTFM_FILE = "model.safetensors"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ALL_IDS = ["vit-base", "vit-small", "vit-tiny", "vit-micro", "merlin", "ct-fm"]


@dataclass
class FakeHub:
    """Two loopback HTTP servers: the Hub's ``/resolve`` API and the storage host it redirects to."""

    files: dict[tuple[str, str], bytes]
    redirect: bool = True
    wrong_etag: bool = False  # announce a sha256 that the bytes do not have
    drop_first_get: int | None = None  # send only this many bytes on the first GET, then close the connection
    requests: list[tuple[str, str, str, str | None]] = field(default_factory=list)  # (server, method, path, Range)

    def __post_init__(self) -> None:
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, kind)) for kind in ("hub", "cdn")]
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self._servers)
        for server in self._servers:
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def sha256(self, repo: str, filename: str) -> str:
        return hashlib.sha256(b"not these bytes" if self.wrong_etag else self.files[repo, filename]).hexdigest()

    def gets(self) -> list[tuple[str, str, str, str | None]]:
        return [r for r in self.requests if r[1] == "GET"]


def _handler(hub: FakeHub, kind: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, *, body: bool) -> None:
            hub.requests.append((kind, self.command, self.path, self.headers.get("Range")))
            if kind == "cdn":  # /blobs/{repo}/{filename}
                repo, _, filename = unquote(self.path.removeprefix("/blobs/")).rpartition("/")
                return self._content(hub.files[repo, filename], body=body)
            parts = unquote(self.path.split("?")[0]).strip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve" or not any(r == "/".join(parts[:2]) for r, _ in hub.files):
                return self._empty(401, {"X-Error-Code": "RepoNotFound"})
            repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if revision not in ("main", COMMIT):
                return self._empty(404, {"X-Error-Code": "RevisionNotFound"})
            if (repo, filename) not in hub.files:
                return self._empty(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
            etag = f'"{hub.sha256(repo, filename)}"'
            headers = {
                "X-Repo-Commit": COMMIT,
                "ETag": etag,
                "X-Linked-Etag": etag,
                "X-Linked-Size": str(len(hub.files[repo, filename])),
            }
            if hub.redirect:
                return self._empty(302, {**headers, "Location": f"{hub.cdn_url}/blobs/{repo}/{filename}"})
            self._content(hub.files[repo, filename], body=body, extra=headers)

        def _empty(self, status: int, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": "0"}.items():
                self.send_header(key, value)
            self.end_headers()

        def _content(self, data: bytes, *, body: bool, extra: dict[str, str] | None = None) -> None:
            start, status, headers = 0, 200, dict(extra or {})
            ranged = self.headers.get("Range", "")
            if ranged.startswith("bytes=") and ranged.endswith("-"):
                start, status = int(ranged[6:-1]), 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data) - start), "Accept-Ranges": "bytes"}.items():
                self.send_header(key, value)
            self.end_headers()
            if not body:
                return
            if hub.drop_first_get is not None:  # an interrupted transfer: part of the body, then the line drops
                cut, hub.drop_first_get = hub.drop_first_get, None
                self.wfile.write(data[start : start + cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data[start:])

    return Handler


@pytest.fixture
def make_hub():
    hubs: list[FakeHub] = []

    def make(content: bytes, **options) -> FakeHub:
        hubs.append(FakeHub(files={(CTFM_REPO, CTFM_FILE): content}, **options))
        return hubs[-1]

    yield make
    for hub in hubs:
        hub.close()


def hub_env(tmp_path: Path, hub: FakeHub | None = None, **extra: str) -> dict[str, str]:
    """The environment with no Hugging Face settings, proxies or user caches of its own, and a fresh HF_HOME."""
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_")) and k.lower() not in proxies
        if k not in ("TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME")
    }
    env.update(
        HOME=str(tmp_path / "home"),
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
        COLUMNS="400",  # rich wraps at the console width: one long line must stay one line
    )
    env["HF_ENDPOINT"] = hub.url if hub is not None else "http://127.0.0.1:9"  # port 9: discard, nothing listens
    env.update(extra)
    return env


def hctembed(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hctembed.cli", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def listed(monkeypatch, tmp_path):
    """``hctembed models --json`` in this process (listing is torch- and network-free), on hub_env's caches."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def run() -> dict[str, dict]:
        result = CliRunner().invoke(app, ["models", "--json"])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        return {row["model"]: row for row in rows}

    return run


def one_line_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode == 2, (run.stdout, run.stderr)
    lines = run.stderr.strip().splitlines()  # INFO lines ("pulling ...") may come before it
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in run.stderr, run.stderr
    return errors[0]


def snapshot_path(tmp_path: Path) -> Path:
    return (
        tmp_path / "hf" / "hub" / "models--project-lighter--ct_fm_feature_extractor" / "snapshots" / COMMIT / CTFM_FILE
    )


def test_models_lists_every_id_then_ctfm_present_after_pull(tmp_path, make_hub, listed):
    content = os.urandom(300_000)
    hub = make_hub(content)
    env = hub_env(tmp_path, hub)

    rows = listed()
    assert list(rows) == ALL_IDS
    assert rows["ct-fm"]["weights"] == "missing (hctembed models pull ct-fm)" and rows["ct-fm"]["weights_path"] is None
    assert rows["merlin"]["weights"] == "missing (hctembed models pull merlin)"
    assert rows["vit-base"]["weights"].startswith("none released") and rows["vit-base"]["source"] == "in-repo"
    assert rows["ct-fm"]["hub_repo"] == CTFM_REPO and rows["ct-fm"]["params"] == 77_760_992
    table = CliRunner().invoke(app, ["models"])
    assert table.exit_code == 0 and all(name in table.stdout for name in ALL_IDS) and "77.8 M" in table.stdout
    assert hub.requests == []  # listing never touches the network

    pull = hctembed("models", "pull", "ct-fm", env=env)
    assert pull.returncode == 0, pull.stderr
    path = Path(pull.stdout.strip())
    assert path == snapshot_path(tmp_path) and path.read_bytes() == content
    assert [(s, m) for s, m, _, _ in hub.requests] == [("hub", "HEAD"), ("hub", "HEAD"), ("cdn", "GET")]

    rows = listed()
    assert rows["ct-fm"]["weights"] == str(path) == rows["ct-fm"]["weights_path"]
    assert rows["merlin"]["weights_path"] is None


def test_listing_does_not_import_torch(tmp_path):
    code = (
        "import sys\nfrom hctembed.cli.app import app\n"
        "try:\n    app(['models', '--json'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    run = subprocess.run([sys.executable, "-c", code], env=hub_env(tmp_path), capture_output=True, text=True)
    assert run.stderr.strip().splitlines()[-1] == "False", run.stderr


def test_catalogue_matches_foreign_specs_and_vit_sizes():
    from hctembed.config import VIT_PRESETS
    from hctembed.model.foreign import FOREIGN
    from hctembed.model.vit3d import ViT3D

    for name, spec in FOREIGN.items():
        info = CATALOGUE[name]
        assert info.dim == spec.dim
    for name in ("vit-micro", "vit-tiny"):
        model = ViT3D(VIT_PRESETS[name])
        assert vit_params(VIT_PRESETS[name]) == sum(p.numel() for p in model.parameters())
        assert CATALOGUE[name].dim == model.config.dim


def test_pull_without_redirect_and_named_revision(tmp_path, make_hub):
    content = os.urandom(50_000)
    hub = make_hub(content, redirect=False)
    run = hctembed("models", "pull", "ct-fm", "--revision", COMMIT, "-q", env=hub_env(tmp_path, hub))
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).read_bytes() == content
    assert {s for s, _, _, _ in hub.requests} == {"hub"}


def test_checksum_mismatch_leaves_no_file(tmp_path, make_hub, listed):
    hub = make_hub(os.urandom(100_000), wrong_etag=True)
    env = hub_env(tmp_path, hub)
    line = one_line_error(hctembed("models", "pull", "ct-fm", env=env))
    assert "checksum mismatch" in line and CTFM_REPO in line
    repo_folder = tmp_path / "hf" / "hub" / "models--project-lighter--ct_fm_feature_extractor"
    assert not [p for p in (repo_folder / "snapshots").rglob("*") if p.is_file() or p.is_symlink()]
    assert not [p for p in (repo_folder / "blobs").rglob("*") if p.is_file()]
    assert listed()["ct-fm"]["weights_path"] is None


def test_offline_needs_the_cache_and_then_makes_no_requests(tmp_path, make_hub):
    content = os.urandom(100_000)
    hub = make_hub(content)
    offline = hub_env(tmp_path, hub, HF_HUB_OFFLINE="1")

    line = one_line_error(hctembed("models", "pull", "ct-fm", env=offline))
    assert "HF_HUB_OFFLINE" in line and "network" in line
    assert hub.requests == []

    online = hctembed("models", "pull", "ct-fm", env=hub_env(tmp_path, hub))
    assert online.returncode == 0, online.stderr
    hub.requests.clear()
    run = hctembed("models", "pull", "ct-fm", env=offline)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == online.stdout.strip() and "already in the cache" in run.stderr
    assert hub.requests == []


def test_interrupted_transfer_resumes_with_a_range_request(tmp_path, make_hub):
    """huggingface_hub 2.4 resumes a dropped transfer in the same run (``Range: bytes=N-``, N a multiple of its
    10 MiB read size); it does not resume across runs (its temporary file is per process and deleted on failure)."""
    size, cut = 24 * 2**20, 15 * 2**20
    content = os.urandom(size)
    hub = make_hub(content, drop_first_get=cut)
    run = hctembed("models", "pull", "ct-fm", env=hub_env(tmp_path, hub))
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).read_bytes() == content
    ranges = [r for _, _, _, r in hub.gets()]
    assert len(ranges) == 2 and ranges[0] is None
    start = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= cut
    assert "verified sha256" in run.stderr


@pytest.mark.parametrize("name", ["nope", "vit-base"])
def test_pull_unknown_or_unreleased_name(name):
    result = CliRunner().invoke(app, ["models", "pull", name])
    assert result.exit_code == 2 and "pullable: merlin, ct-fm" in result.stderr and "Traceback" not in result.output


def test_pull_unknown_revision_is_one_line(tmp_path, make_hub):
    line = one_line_error(
        hctembed("models", "pull", "ct-fm", "--revision", "no-such-branch", env=hub_env(tmp_path, make_hub(b"x")))
    )
    assert "revision 'no-such-branch' not found" in line and CTFM_REPO in line


def test_pull_into_xdg_cache_is_found_by_model_lookup(tmp_path, make_hub):
    """huggingface_hub honours XDG_CACHE_HOME; so does --model's cache lookup (foreign.find_weights)."""
    env = hub_env(tmp_path, make_hub(b"weights"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    del env["HF_HOME"]
    run = hctembed("models", "pull", "ct-fm", env=env)
    assert run.returncode == 0, run.stderr
    pulled = Path(run.stdout.strip())
    assert pulled.is_relative_to(tmp_path / "xdg" / "huggingface" / "hub") and "warning" not in run.stderr
    listed = hctembed("models", "--json", env=env)
    rows = {r["model"]: r for r in map(json.loads, listed.stdout.strip().splitlines())}
    assert rows["ct-fm"]["weights_path"] == str(pulled)


def test_unreachable_hub_names_repo_and_endpoint(tmp_path):
    line = one_line_error(hctembed("models", "pull", "merlin", env=hub_env(tmp_path)))
    assert "stanfordmimi/Merlin" in line and "http://127.0.0.1:9" in line


@pytest.mark.slow
def test_pulled_ctfm_weights_load_through_load_encoder(tmp_path, make_hub):
    """The released layout (the encoder's keys, no prefix) pulled, then ``load_encoder("ct-fm")`` finds and loads it."""
    import torch
    from safetensors.torch import save_file

    from hctembed.model.ctfm import CTFMEncoder
    from hctembed.model.merlin import MerlinImageEncoder

    torch.manual_seed(1)
    model = CTFMEncoder()
    assert sum(p.numel() for p in model.parameters()) == CATALOGUE["ct-fm"].params
    assert sum(p.numel() for p in MerlinImageEncoder().parameters()) == CATALOGUE["merlin"].params
    served = tmp_path / "served.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict_for_checkpoint().items()}, str(served))
    hub = make_hub(served.read_bytes())
    env = hub_env(tmp_path, hub)

    pull = hctembed("models", "pull", "ct-fm", env=env)
    assert pull.returncode == 0, pull.stderr
    path = Path(pull.stdout.strip())
    assert path == snapshot_path(tmp_path)

    check = (
        "import sys, torch\nfrom safetensors.torch import load_file\n"
        "from hctembed.model.encoders import load_encoder\n"
        "enc = load_encoder('ct-fm')\nserved = load_file(sys.argv[1])\nown = enc.model.state_dict()\n"
        "assert set(own) == {'encoder.' + k for k in served}\n"
        "assert all(torch.equal(own['encoder.' + k], v) for k, v in served.items())\n"
        "print(enc.weights_path)"
    )
    run = subprocess.run(
        [sys.executable, "-c", check, str(served)], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()) == path.resolve()
