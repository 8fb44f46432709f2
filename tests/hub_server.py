"""A fake Hugging Face Hub for tests: a stdlib HTTP server on 127.0.0.1, in memory, no external traffic.

It implements the endpoints that huggingface_hub 2.x and transformers 5.x call to create model repos, commit files and
download them (hf_stack.md §6): whoami, repo creation, README YAML validation, preupload, commit (NDJSON with base64
file contents), model info and revision info, the file tree, and HEAD/GET `resolve` with the `X-Repo-Commit` / `ETag` /
`Content-Length` headers (404 with `X-Error-Code` for missing repos, revisions and files). Preupload answers
"regular" for every file, so no LFS or Xet upload ever happens. Only the `main` branch exists; writes need a token
("Bearer hf_..."); reads are not access-checked, so private repos are readable (there is one fake user).

    with FakeHub() as hub:          # or hub.start() / hub.stop()
        env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_fake", "HF_HUB_OFFLINE": "0", "HF_HOME": ...}

Tests can read the state (`hub.repos[repo_id].commits`, each with its full file snapshot) and create a repo directly
with `hub.seed(repo_id, files)`.
"""

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "fake-user"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"  # what a new Hub repo starts with
TIMESTAMP = "2026-01-01T00:00:00.000Z"
REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("GET", re.compile(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?"), "model_info"),
    ("GET", re.compile(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"), "tree"),
    ("HEAD", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    ("GET", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


def blob_id(content: bytes) -> str:
    """The git blob sha1 of `content` (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    """One commit: its sha, message and the repository's full file snapshot after it."""

    sha: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    private: bool = False
    commits: list[Commit] = field(default_factory=list)

    def add_commit(self, message: str, files: dict[str, bytes]) -> Commit:
        parent = self.commits[-1].sha if self.commits else ""
        digest = hashlib.sha1(parent.encode() + message.encode())
        for path in sorted(files):
            digest.update(path.encode() + blob_id(files[path]).encode())
        commit = Commit(digest.hexdigest(), message, dict(files))
        self.commits.append(commit)
        return commit

    def at(self, revision: str) -> Commit | None:
        """The commit `revision` ("main" or a commit sha) names, or None."""
        if revision == "main":
            return self.commits[-1]
        return next((commit for commit in self.commits if commit.sha == revision), None)


class HubError(Exception):
    """An error reply: HTTP status, X-Error-Code header (or None) and message."""

    def __init__(self, status: int, code: str | None, message: str):
        super().__init__(message)
        self.status, self.code = status, code


class FakeHub:
    """The server and its in-memory repositories; `url` is the value for `HF_ENDPOINT`."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fake-hub", daemon=True)

    def start(self) -> "FakeHub":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def seed(self, repo_id: str, files: dict[str, bytes], *, private: bool = False) -> Commit:
        """Create `repo_id` holding `files` (test setup without a client)."""
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(private=private))
            return repo.add_commit("seed", files)

    # --- endpoint implementations: (request) -> (status, headers, body) -----------------------------------------

    def whoami(self, request):
        self._require_token(request)
        return _json({"type": "user", "name": USER, "fullname": "Fake User", "orgs": [],
                      "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}}})

    def create_repo(self, request):
        self._require_token(request)
        body = request.json()
        if body.get("type", "model") != "model":
            raise HubError(400, None, "the fake Hub has model repositories only")
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        url = f"{self.url}/{repo_id}"
        with self.lock:
            if repo_id in self.repos:
                return _json({"error": "You already created this model repo", "url": url}, status=409)
            repo = self.repos[repo_id] = Repo(private=body.get("visibility", "public") == "private")
            repo.add_commit("initial commit", {".gitattributes": GITATTRIBUTES})
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def validate_yaml(self, request):
        content = request.json()["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            return _json({"errors": [{"message": f"invalid YAML: {error}"}]}, status=400)
        if not isinstance(metadata, dict):
            return _json({"errors": [{"message": "metadata must be a mapping"}]}, status=400)
        return _json({})

    def preupload(self, request, repo, rev):
        self._require_token(request)
        self._commit_of(repo, rev)
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in request.json()["files"]]
        return _json({"files": files})

    def commit(self, request, repo, rev):
        self._require_token(request)
        if rev != "main":
            raise HubError(400, None, "the fake Hub commits to main only")
        message, files = "", None
        with self.lock:
            files = dict(self._commit_of(repo, rev).files)
            for line in request.body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value["summary"]
                elif key == "file" and value.get("encoding") == "base64":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {path: data for path, data in files.items() if not path.startswith(prefix)}
                else:
                    raise HubError(400, None, f"unsupported commit operation {key!r} in the fake Hub")
            commit = self.repos[repo].add_commit(message, files)
        return _json({"commitUrl": f"{self.url}/{repo}/commit/{commit.sha}", "commitOid": commit.sha,
                      "pullRequestUrl": None})

    def model_info(self, request, repo, rev=None):
        commit = self._commit_of(repo, rev or "main")
        card = _card_metadata(commit.files.get("README.md", b"").decode())
        return _json({
            "_id": repo, "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.sha,
            "private": self.repos[repo].private, "disabled": False, "gated": False, "downloads": 0, "likes": 0,
            "lastModified": TIMESTAMP, "createdAt": TIMESTAMP, "tags": card.get("tags", []),
            "pipeline_tag": card.get("pipeline_tag"), "library_name": card.get("library_name"), "cardData": card,
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        })

    def tree(self, request, repo, rev, path=None):
        commit = self._commit_of(repo, rev)
        prefix = unquote(path).rstrip("/") + "/" if path else ""
        recursive = request.query.get("recursive", ["false"])[0].lower() == "true"
        entries, folders = [], set()
        for file_path in sorted(commit.files):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            data = commit.files[file_path]
            entries.append({"type": "file", "path": file_path, "size": len(data), "oid": blob_id(data)})
        if prefix and not entries and not folders:
            raise HubError(404, "EntryNotFound", f"{path} does not exist in {repo}@{rev}")
        entries += [{"type": "directory", "path": folder, "oid": blob_id(folder.encode()), "size": 0}
                    for folder in sorted(folders)]
        return _json(entries)

    def resolve(self, request, repo, rev, path):
        commit = self._commit_of(repo, rev)
        path = unquote(path)
        if path not in commit.files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist in {repo}@{rev}")
        data = commit.files[path]
        return 200, {"X-Repo-Commit": commit.sha, "ETag": f'"{blob_id(data)}"'}, data

    # --- helpers ----------------------------------------------------------------------------------------------

    def _commit_of(self, repo_id: str, revision: str) -> Commit:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        commit = repo.at(unquote(revision))
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Revision {revision} not found in {repo_id}")
        return commit

    @staticmethod
    def _require_token(request):
        if not request.headers.get("Authorization", "").startswith("Bearer hf_"):
            raise HubError(401, None, "Invalid credentials in Authorization header")


@dataclass
class _Request:
    headers: object  # http.client.HTTPMessage: case-insensitive get()
    query: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def _json(value, status: int = 200):
    return status, {"Content-Type": "application/json"}, json.dumps(value).encode()


def _card_metadata(readme: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", readme, re.DOTALL)
    return (yaml.safe_load(match.group(1)) or {}) if match else {}


def _handler_class(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._dispatch("GET")

        def do_HEAD(self):
            self._dispatch("HEAD")

        def do_POST(self):
            self._dispatch("POST")

        def _dispatch(self, method):
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            request = _Request(self.headers, parse_qs(url.query), self.rfile.read(length) if length else b"")
            try:
                for route_method, pattern, name in ROUTES:
                    match = pattern.fullmatch(url.path)
                    if route_method == method and match:
                        kwargs = {key: value for key, value in match.groupdict().items() if value is not None}
                        status, headers, body = getattr(hub, name)(request, **kwargs)
                        break
                else:
                    raise HubError(404, None, f"{method} {url.path} is not implemented by the fake Hub")
            except HubError as error:
                status, headers, body = _json({"error": str(error)}, status=error.status)
                if error.code:
                    headers["X-Error-Code"] = error.code
                headers["X-Error-Message"] = str(error)
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(body)

        def log_message(self, *args):  # keep test output clean
            pass

    return Handler
