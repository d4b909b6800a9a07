"""Fixtures shared by the Hub tests: a local server speaking the Hugging Face Hub API, and a Hugging Face
cache built by hand (what a download leaves), so that publishing and loading run offline."""
import base64
import contextlib
import hashlib
import io
import json
import os
import re
import runpy
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

HUB_FILES = ('README.md', 'config.json', 'model.safetensors')
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models: one thread is as fast, and does not spin against other work on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def run_script():
    """``run_script(path, *args)``: ``python path args`` from the repository root, run in this process through
    the script's own ``__main__`` block (argv, exit status, stdout and stderr as the command line gives them),
    without a second interpreter start (5-10 s of imports on 2 loaded cores). For tests of what a script
    does, not of the interpreter; subprocesses the script starts itself stay subprocesses. Returns a
    ``subprocess.CompletedProcess``. Session-scoped, so that module fixtures can run a script once."""
    return _run_script


def _run_script(path, *args) -> subprocess.CompletedProcess:
    argv = [str(path), *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_cwd = sys.argv, os.getcwd()
    try:
        sys.argv = argv
        os.chdir(REPO)
        # sys.stdout / sys.stderr are swapped for the whole process: a thread the script starts writes here too
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(argv[0], run_name='__main__')
                returncode = 0
            except SystemExit as stop:  # sys.exit(n) as the interpreter reads it: None is 0, a message is 1
                returncode = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
                if stop.code is not None and not isinstance(stop.code, int):
                    print(stop.code, file=sys.stderr)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(argv, returncode, out.getvalue(), err.getvalue())


@pytest.fixture
def fake_hub():
    """``FakeHub``: ``with fake_hub() as server`` serves the Hub endpoints of an upload at ``server.url``."""
    return FakeHub


@pytest.fixture
def populate_hub_cache():
    """``populate_hub_cache(hub_cache, repo_id, folder)`` puts ``folder``'s Hub files in the cache layout."""
    return _populate_hub_cache


def _populate_hub_cache(hub_cache: Path, repo_id: str, folder: Path, commit: str = '1' * 40):
    """huggingface_hub's cache layout: models--org--name/{blobs/<hash>, snapshots/<commit>/<file> -> blob,
    refs/main = commit}."""
    repo = hub_cache / f'models--{repo_id.replace("/", "--")}'
    (repo / 'blobs').mkdir(parents=True)
    (repo / 'refs').mkdir()
    (repo / 'refs' / 'main').write_text(commit)
    snapshot = repo / 'snapshots' / commit
    snapshot.mkdir(parents=True)
    for name in HUB_FILES:
        data = (folder / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / 'blobs' / blob).write_bytes(data)
        (snapshot / name).symlink_to(Path('..', '..', 'blobs', blob))


class FakeHub(ThreadingHTTPServer):
    """The Hub endpoints huggingface_hub's create_repo / create_branch / upload_folder call, in memory."""

    def __init__(self, fail_with=None):
        super().__init__(('127.0.0.1', 0), _FakeHubHandler)
        self.fail_with = fail_with  # (status, json body) answered to every request
        self.requests, self.created, self.branches, self.commits, self.unexpected = [], [], [], [], []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self):
        return f'http://127.0.0.1:{self.server_address[1]}'

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _FakeHubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def _handle(self):
        hub_server = self.server
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        path = urlsplit(self.path).path
        hub_server.requests.append(dict(method=self.command, path=path, auth=self.headers.get('Authorization')))
        if hub_server.fail_with:
            return self._reply(*hub_server.fail_with)
        if path == '/api/repos/create':
            payload = json.loads(body)
            hub_server.created.append(payload)
            repo = f'{payload["organization"]}/{payload["name"]}'
            return self._reply(200, dict(url=f'{hub_server.url}/{repo}', name=repo, id='0'))
        if path == '/api/validate-yaml':
            return self._reply(200, dict(errors=[], warnings=[]))
        match = re.fullmatch(r'/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)', path)
        if match and self.command == 'POST':
            repo, action, revision = match.group(1), match.group(2), unquote(match.group(3))
            if action == 'branch':
                hub_server.branches.append((repo, revision))
                return self._reply(200, {})
            if action == 'preupload':
                files = json.loads(body)['files']
                return self._reply(200, dict(files=[dict(path=f['path'], uploadMode='regular', shouldIgnore=False,
                                                         oid=None) for f in files]))
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(line['value'] for line in lines if line['key'] == 'header')
            files = {line['value']['path']: base64.b64decode(line['value']['content'])
                     for line in lines if line['key'] == 'file'}
            other = [line['key'] for line in lines if line['key'] not in ('header', 'file')]  # LFS, deletions
            hub_server.commits.append(dict(repo=repo, revision=revision, summary=header['summary'], files=files,
                                           other=other))
            return self._reply(200, dict(commitUrl=f'{hub_server.url}/{repo}/commit/{"a" * 40}', commitOid='a' * 40,
                                         pullRequestUrl=None))
        hub_server.unexpected.append((self.command, path))
        return self._reply(404, dict(error=f'no such endpoint {path}'))


