"""A Hugging Face Hub stand-in on loopback: what `huggingface_hub` 2.4.0 calls to create a dataset and upload a folder.

Endpoints, as the client sends them (huggingface_hub 2.4.0 source; the path in each line is the file to read):
- `POST /api/repos/create` {name, organization, type, visibility} → {url}; 409 (with {url}) when it exists, which
  `create_repo(exist_ok=True)` accepts (`hf_api.py` `create_repo`). A new repository gets an initial commit holding
  the Hub's default dataset `.gitattributes` (LFS for `*.parquet` and the other binary types).
- `GET /api/datasets/{repo}[/revision/{rev}]` → {id, sha, private, cardData, siblings} (`hf_api.py` `dataset_info`);
  404 with `X-Error-Code: RepoNotFound` for an unknown repository (`utils/_http.py` `hf_raise_for_status`).
- `GET /api/datasets/{repo}/tree/{rev}[/{path}]?recursive=&expand=` → file and folder entries, 1,000 a page with a
  `Link: <…>; rel="next"` header (`hf_api.py` `_iter_repo_tree_pages`, `utils/_pagination.py`).
- `POST /api/validate-yaml` {content, repoType} → {errors, warnings}; 400 when the card's YAML header does not parse
  (`hf_api.py` `_validate_yaml`, called by `create_commit` before it uploads a README.md).
- `POST /api/datasets/{repo}/preupload/{rev}` {files: [{path, sample, size}]} → {files: [{path, uploadMode,
  shouldIgnore, oid}], commitOid}: `lfs` for a path an LFS rule of `.gitattributes` matches or a file over 10 MiB,
  else `regular`; `oid` is the current file's (sha256 for LFS, git sha1 otherwise) so unchanged files are skipped
  (`_commit_api.py` `_fetch_upload_modes`, `CommitOperationAdd._local_oid`).
- `POST /datasets/{repo}.git/info/lfs/objects/batch` (git-lfs batch API, basic transfer) → per object either no
  `actions` (already stored: nothing is sent again, which is what makes a rerun resume) or `upload` + `verify`
  hrefs (`lfs.py` `post_lfs_batch_info`, `lfs_upload`); then `PUT <upload href>` with the bytes, whose sha256 and
  size must match, and `POST <verify href>` {oid, size} (`lfs.py` `_upload_single_part`).
- `POST /api/datasets/{repo}/commit/{rev}` ndjson: `header` {summary, description, parentCommit?}, `file`
  (base64), `lfsFile` {path, algo, oid, size} (the object must have been uploaded), `deletedFile` / `deletedFolder`
  (must exist) → {commitUrl, commitOid, success} (`_commit_api.py` `_prepare_commit_payload`, `_send_commit`).

Writes need `Authorization: Bearer <token>` (401 otherwise). Not stood in: the Xet storage protocol (hf_xet's CAS
uploads, which `upload_folder` takes when `hf_xet` is installed): tests set `HF_HUB_DISABLE_XET`, so the client
takes its LFS path, which huggingface_hub itself uses when hf_xet is absent; and LFS multipart (the Hub asks for it
only for files of several GB).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import yaml

LFS_THRESHOLD = 10 * 2**20
PAGE = 1000
# The Hub's default .gitattributes for a new dataset repository (the LFS rules; abridged to the binary types).
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.gz", "*.h5", "*.joblib", "*.lz4", "*.npy", "*.npz", "*.onnx",
    "*.parquet", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.safetensors", "*.tar", "*.tflite", "*.zip", "*.zst",
    "*.mds", "*.tfrecord", "*.wav", "*.mp3", "*.jpg", "*.png", "*.webp",
))


def git_sha1(data: bytes) -> str:
    """`git hash-object` of a blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    """One dataset repository: its files at head (path → bytes, and which are LFS), and its commits."""

    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)
    commits: list[str] = field(default_factory=list)

    @property
    def head(self) -> str:
        return self.commits[-1]

    def lfs_rules(self) -> list[str]:
        text = self.files.get(".gitattributes", b"").decode()
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]

    def mode(self, path: str, size: int) -> str:
        name = path.rsplit("/", 1)[-1]
        lfs = size > LFS_THRESHOLD or any(fnmatch.fnmatch(name, rule) or fnmatch.fnmatch(path, rule)
                                          for rule in self.lfs_rules())
        return "lfs" if lfs else "regular"

    def oid(self, path: str) -> str | None:
        if path not in self.files:
            return None
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if path in self.lfs else git_sha1(data)


class HubState:
    """Everything the stand-in holds, and what tests read back."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # LFS store: sha256 → bytes
        self.lfs_bytes_received = 0
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def commit(self, repo: Repo, summary: str) -> str:
        oid = hashlib.sha1(f"{repo.repo_id}:{len(repo.commits)}:{summary}".encode()).hexdigest()
        repo.commits.append(oid)
        return oid


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # ── plumbing ─────────────────────────────────────────────────────────────────────────────────────────────────
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, obj: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.state.token}":
            return True
        self._error(401, "Invalid credentials in Authorization header")
        return False

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
        return repo

    def _base(self) -> str:
        return f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"

    # ── routes ───────────────────────────────────────────────────────────────────────────────────────────────────
    def do_GET(self) -> None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        with self.state.lock:
            self.state.requests.append(("GET", url.path))
            if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
                repo_id = "/".join(parts[2:4])
                rest = parts[4:]
                if not rest or rest[0] == "revision":
                    return self._info(repo_id)
                if rest[0] == "tree":
                    return self._tree(repo_id, "/".join(rest[2:]), parse_qs(url.query), url.path)
            self._error(404, f"no route GET {url.path}")

    def do_POST(self) -> None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        body = self._body()
        with self.state.lock:
            self.state.requests.append(("POST", url.path))
            if url.path == "/api/repos/create":
                return self._create(json.loads(body))
            if url.path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            if parts[:2] == ["api", "datasets"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
                repo_id = "/".join(parts[2:4])
                if parts[4] == "preupload":
                    return self._preupload(repo_id, json.loads(body))
                return self._commit(repo_id, body)
            if parts[0] == "datasets" and url.path.endswith(".git/info/lfs/objects/batch"):
                repo_id = "/".join(parts[1:3]).removesuffix(".git")
                return self._batch(repo_id, json.loads(body))
            if parts[0] == "lfs-verify":
                return self._verify(json.loads(body))
            self._error(404, f"no route POST {url.path}")

    def do_PUT(self) -> None:
        url = urlparse(self.path)
        body = self._body()
        with self.state.lock:
            self.state.requests.append(("PUT", url.path))
            parts = url.path.strip("/").split("/")
            if parts[0] == "lfs-upload" and len(parts) == 3:
                return self._lfs_put(parts[1], int(parts[2]), body)
            self._error(404, f"no route PUT {url.path}")

    # ── handlers ─────────────────────────────────────────────────────────────────────────────────────────────────
    def _create(self, payload: dict[str, Any]) -> None:
        if not self._authorized():
            return
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        url = f"{self._base()}/datasets/{repo_id}"
        if payload.get("type") != "dataset":
            return self._error(400, f"this stand-in holds datasets only, not {payload.get('type')}")
        if repo_id in self.state.repos:
            return self._send(409, {"error": "You already created this dataset repo", "url": url})
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        repo.files[".gitattributes"] = GITATTRIBUTES.encode()
        self.state.commit(repo, "initial commit")
        self.state.repos[repo_id] = repo
        self._send(200, {"url": url})

    def _info(self, repo_id: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if repo.private and not self._authorized():
            return
        card = repo.files.get("README.md", b"").decode()
        card_data = yaml.safe_load(card.split("---")[1]) if card.startswith("---") else None
        self._send(200, {"id": repo_id, "sha": repo.head, "private": repo.private, "cardData": card_data,
                         "siblings": [{"rfilename": p} for p in sorted(repo.files)]})

    def _tree(self, repo_id: str, prefix: str, query: dict[str, list[str]], path: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        entries: dict[str, dict[str, Any]] = {}
        base = prefix.strip("/")
        for file_path in sorted(repo.files):
            if base and not file_path.startswith(base + "/"):
                continue
            rest = file_path[len(base) + 1:] if base else file_path
            pieces = rest.split("/")
            for depth in range(1, len(pieces)):
                folder = "/".join(([base] if base else []) + pieces[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder, "oid": git_sha1(folder.encode())})
            if recursive or len(pieces) == 1:
                data = repo.files[file_path]
                entry = {"type": "file", "path": file_path, "size": len(data), "oid": git_sha1(data)}
                if file_path in repo.lfs:
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries[file_path] = entry
        items = [entries[k] for k in sorted(entries)]
        start = int(query.get("cursor", ["0"])[0])
        page = items[start:start + PAGE]
        headers = {}
        if start + PAGE < len(items):
            headers["Link"] = f'<{self._base()}{path}?recursive={recursive}&cursor={start + PAGE}>; rel="next"'
        self._send(200, page, headers)

    def _validate_yaml(self, payload: dict[str, Any]) -> None:
        content = payload.get("content", "")
        if content.startswith("---"):
            try:
                header = yaml.safe_load(content.split("---")[1])
                if not isinstance(header, dict):
                    raise yaml.YAMLError("the header is not a mapping")
            except yaml.YAMLError as exc:
                return self._send(400, {"errors": [{"message": f"Invalid YAML: {exc}"}], "warnings": []})
        self._send(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, payload: dict[str, Any]) -> None:
        if not self._authorized():
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        files = []
        for f in payload["files"]:
            base64.b64decode(f["sample"], validate=True)
            files.append({"path": f["path"], "uploadMode": repo.mode(f["path"], int(f["size"])),
                          "shouldIgnore": False, "oid": repo.oid(f["path"])})
        self._send(200, {"files": files, "commitOid": repo.head})

    def _batch(self, repo_id: str, payload: dict[str, Any]) -> None:
        if not self._authorized():
            return
        if self._repo(repo_id) is None:
            return
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", []):
            return self._error(422, "only upload with the basic transfer is served")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if self.state.objects.get(oid) is None or len(self.state.objects[oid]) != size:
                entry["actions"] = {
                    "upload": {"href": f"{self._base()}/lfs-upload/{oid}/{size}"},
                    "verify": {"href": f"{self._base()}/lfs-verify/{repo_id}"},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, oid: str, size: int, body: bytes) -> None:
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, f"uploaded bytes do not match oid {oid} and size {size}")
        self.state.objects[oid] = body
        self.state.lfs_bytes_received += len(body)
        self._send(200)

    def _verify(self, payload: dict[str, Any]) -> None:
        if not self._authorized():
            return
        data = self.state.objects.get(payload["oid"])
        if data is None or len(data) != int(payload["size"]):
            return self._error(404, f"object {payload['oid']} was not uploaded")
        self._send(200, {"success": True})

    def _commit(self, repo_id: str, body: bytes) -> None:
        if not self._authorized():
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        if self.headers.get("Content-Type") != "application/x-ndjson":
            return self._error(400, "the commit payload must be application/x-ndjson")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return self._error(400, "the first line of a commit must be its header")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, repo.head):
            return self._error(412, "A commit has happened since. Please refresh and try again.")
        files, lfs = dict(repo.files), set(repo.lfs)
        for item in lines[1:]:
            value = item["value"]
            path = value["path"]
            if item["key"] == "file":
                files[path] = base64.b64decode(value["content"])
                lfs.discard(path)
            elif item["key"] == "lfsFile":
                data = self.state.objects.get(value["oid"])
                if data is None or len(data) != int(value["size"]):
                    return self._error(422, f"Your push was rejected because an LFS pointer pointed to a file that "
                                            f"does not exist ({path})")
                files[path] = data
                lfs.add(path)
            elif item["key"] == "deletedFile":
                if path not in files:
                    return self._error(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
                lfs.discard(path)
            elif item["key"] == "deletedFolder":
                for p in [p for p in files if p.startswith(path.rstrip("/") + "/")]:
                    del files[p]
                    lfs.discard(p)
            else:
                return self._error(400, f"unknown commit operation {item['key']!r}")
        repo.files, repo.lfs = files, lfs
        oid = self.state.commit(repo, header.get("summary", ""))
        self._send(200, {"commitUrl": f"{self._base()}/datasets/{repo_id}/commit/{oid}", "commitOid": oid,
                         "success": True, "pullRequestUrl": None})


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


class HubServer:
    """The stand-in, serving on a free loopback port while used as a context manager."""

    def __init__(self, token: str = "hf_test_token") -> None:
        self.state = HubState(token)
        self._server = _Server(self.state)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def repo(self, repo_id: str) -> Repo:
        return self.state.repos[repo_id]

    def add_dataset(self, repo_id: str, card: str) -> None:
        """A source dataset whose card the push reads its license from."""
        repo = Repo(repo_id, private=False, files={"README.md": card.encode()})
        self.state.commit(repo, "initial commit")
        self.state.repos[repo_id] = repo

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
