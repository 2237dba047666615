"""The locked admin surface and the request limits (issue 23): the reload endpoint needs the admin token and
loads only under the allowed root, saying nothing about which paths exist; deep JSON, slow bodies and slow
headers are refused without a 5xx and without holding the server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import _serve_models as models  # noqa: E402
from deepfm.serve.app import ServeSettings, create_app  # noqa: E402
from deepfm.serve.limits import json_depth  # noqa: E402

TOKEN = "correct-horse-battery"
ADMIN = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """root/served (the model at start), root/other (a second model); outside/ beside root."""
    base = tmp_path_factory.mktemp("admin")
    (base / "root").mkdir()
    shutil.copytree(models.criteo_model(), base / "root" / "served")
    shutil.copytree(models.criteo_model(), base / "root" / "other")
    shutil.copytree(models.criteo_model(), base / "outside")
    (base / "root" / "link-out").symlink_to(base / "outside")
    return base / "root"


@pytest.fixture(scope="module")
def client(root):
    return TestClient(create_app(root / "served", ServeSettings(admin_token=TOKEN)))


def test_without_a_token_the_reload_endpoint_is_off(root):
    c = TestClient(create_app(root / "served"))
    for headers in ({}, ADMIN):
        resp = c.post("/v1/reload", json={}, headers=headers)
        assert resp.status_code == 403 and "admin token" in resp.json()["detail"]
    off = TestClient(create_app(root / "served", ServeSettings(admin_token=TOKEN, reload_endpoint=False)))
    assert off.post("/v1/reload", json={}, headers=ADMIN).status_code == 403


def test_no_token_is_401_and_a_wrong_one_403(client):
    version = client.get("/healthz").json()["model_version"]
    missing = client.post("/v1/reload", json={})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    for wrong in ("Bearer nope", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN):
        resp = client.post("/v1/reload", json={}, headers={"authorization": wrong})
        assert resp.status_code in (401, 403), (wrong, resp.text)
        assert TOKEN not in resp.text
    assert client.get("/healthz").json()["model_version"] == version
    assert client.post("/v1/reload", json={}, headers=ADMIN).status_code == 200  # the current directory


def test_reload_loads_only_under_the_root_and_names_no_path(client, root):
    ok = client.post("/v1/reload", json={"model_dir": str(root / "other")}, headers=ADMIN)
    assert ok.status_code == 200 and ok.json()["path"] == str((root / "other").resolve())
    relative = client.post("/v1/reload", json={"model_dir": "served"}, headers=ADMIN)  # taken from the root
    assert relative.status_code == 200 and relative.json()["path"] == str((root / "served").resolve())
    outside = root.parent / "outside"
    attempts = [str(outside), str(root / "link-out"), str(root / ".." / "outside"), "../outside",
                str(root / "served" / ".." / ".." / "outside"), "/etc", "/nonexistent/model", "../nope",
                str(root.parent / "nope"), "a\x00b", str(root / "link-out" / "..")]
    bodies = set()
    for path in attempts:
        resp = client.post("/v1/reload", json={"model_dir": path}, headers=ADMIN)
        assert resp.status_code == 403, (path, resp.text)
        bodies.add(resp.text)
        assert str(root.parent) not in resp.text and "outside" not in resp.text
    assert len(bodies) == 1  # one answer whether the path exists or not
    inside_missing = client.post("/v1/reload", json={"model_dir": "nope"}, headers=ADMIN)
    assert inside_missing.status_code == 404 and "still serving" in inside_missing.json()["detail"]
    assert client.get("/v1/model").json()["path"] == str((root / "served").resolve())


def test_model_root_widens_what_reload_may_load(root):
    c = TestClient(create_app(root / "served", ServeSettings(admin_token=TOKEN, model_root=str(root.parent))))
    resp = c.post("/v1/reload", json={"model_dir": str(root.parent / "outside")}, headers=ADMIN)
    assert resp.status_code == 200


@pytest.mark.parametrize("damage", ["random-bytes", "truncated"])
def test_a_reload_of_damaged_weights_is_a_409_and_the_model_keeps_serving(root, damage):
    c = TestClient(create_app(root / "served", ServeSettings(admin_token=TOKEN)))
    version = c.get("/healthz").json()["model_version"]
    bad = root / f"bad-{damage}"
    shutil.copytree(root / "served", bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(os.urandom(4096) if damage == "random-bytes" else data[: len(data) // 3])
    resp = c.post("/v1/reload", json={"model_dir": str(bad)}, headers=ADMIN)
    assert resp.status_code == 409, resp.text
    detail = resp.json()["detail"]
    assert f"still serving version {version}" in detail and str(weights.resolve()) in detail, detail
    assert ("not a safetensors file" if damage == "random-bytes" else "truncated") in detail, detail
    row = {"rows": [{"id": 1, "features": {"I1": 3, "C1": "68fd1e64"}}]}
    assert c.post("/v1/predict", json=row).json()["model_version"] == version


def test_the_openapi_document_declares_the_bearer_token(client):
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    reload_op = spec["paths"]["/v1/reload"]["post"]
    assert {"401", "403"} <= set(reload_op["responses"]) and reload_op["security"] == [{"HTTPBearer": []}]


@pytest.mark.parametrize("depth", [33, 900, 5000, 200_000])
def test_deep_json_is_a_400_not_a_500(client, depth):
    for body in (b'{"rows":[{"id":' + b"[" * depth + b"]" * depth + b',"features":{}}]}',
                 b'{"rows":[{"features":{"C1":' + b"[" * depth + b"1" + b"]" * depth + b"}}]}",
                 b'{"rows":[{"id":' + b'{"a":' * depth + b"1" + b"}" * depth + b',"features":{}}]}'):
        resp = client.post("/v1/predict", content=body)
        assert resp.status_code == 400, resp.text[:200]
        assert "nested deeper than 32" in resp.json()["detail"]
    assert client.get("/healthz").status_code == 200


def test_depth_counts_brackets_outside_strings_only(client):
    assert json_depth(b'{"a": "[[[[[[{{{{", "b": [[1]], "c": "\\"[["}') == 3
    assert json_depth(b"[]") == 1 and json_depth(b"") == 0 and json_depth(b"3") == 0
    deep_id = {"rows": [{"id": {"k": "[" * 100}, "features": {"C1": "[[[[" * 50}}]}
    resp = client.post("/v1/predict", json=deep_id)
    assert resp.status_code == 200 and resp.json()["predictions"][0]["id"] == {"k": "[" * 100}
    nested = {"rows": [{"id": [[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]], "features": {}}]}  # 27 deep
    assert client.post("/v1/predict", json=nested).status_code == 200


# ------------------------------------------------------------------ slow clients against a real server
def _serve(args: list[str], log) -> tuple[subprocess.Popen, int]:
    port = models.free_port()
    env = dict(os.environ, PYTHONPATH=str(models.ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "deepfm", "serve", *args, "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if b"200 OK" in s.recv(1000):
                    return proc, port
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    proc.wait(timeout=20)
    pytest.fail("server did not start")


def _read_all(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(seconds)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except TimeoutError:
        pass
    return out


def test_slow_bodies_and_slow_headers_are_cut_off(root, tmp_path):
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc, port = _serve([str(root / "served"), "--body-timeout", "1", "--header-timeout", "1.5"], log)
    try:
        start = time.monotonic()
        slow_body = socket.create_connection(("127.0.0.1", port))
        slow_body.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"rows\": [")
        slow_head = socket.create_connection(("127.0.0.1", port))
        slow_head.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        idle = socket.create_connection(("127.0.0.1", port))  # sends nothing at all
        answer = _read_all(slow_body, 10)
        assert answer.startswith(b"HTTP/1.1 408") and b"within 1 seconds" in answer, answer
        assert _read_all(slow_head, 10) == b"" and _read_all(idle, 10) == b""  # closed by the server
        assert time.monotonic() - start < 8
        # meanwhile and after, the server answers
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert b"200 OK" in _read_all(s, 5)
        for s in (slow_body, slow_head, idle):
            s.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
