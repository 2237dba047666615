"""Every fenced snippet of README.md and docs/*.md runs as written, in order, on the shipped example data.

A copy of the repository's example data, Makefile and pyproject.toml (with the set-up virtual environment) is
the working folder, as a fresh clone with `make setup` done. ``bash`` blocks run under ``bash -eu -o pipefail``,
``python`` blocks with the environment's Python, ``json`` / ``yaml`` blocks must parse; ``text`` and unlabelled
blocks are usage synopses, diagrams and sample output. A block may be left out only by a comment right above it,
``<!-- not run: REASON -->``. Two things differ from a person at a terminal: a block that starts
``deepfm serve`` runs in the background (the "one terminal") until the end, and the port 8000 of the documents
is replaced by a free one (other programs on a test machine may hold 8000).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import _serve_models as models

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:^<!-- not run: (?P<reason>[^\n]*?) -->\n)?^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$",
                   re.M | re.S)


@dataclass
class Block:
    doc: str
    line: int
    lang: str
    body: str
    skip: str | None


def blocks() -> list[Block]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            out.append(Block(doc.name, text[:m.start("lang")].count("\n") + 1, m["lang"], m["body"], m["reason"]))
    return out


def test_every_runnable_block_is_found_and_every_skip_has_a_reason():
    found = blocks()
    langs = {b.lang for b in found}
    assert langs <= {"bash", "python", "json", "yaml", "text", ""}, langs
    skipped = [b for b in found if b.skip is not None]
    assert all(b.lang == "bash" and len(b.skip) > 10 for b in skipped)
    assert len(skipped) == 3  # make test, the torchrun launches, the SLURM script
    # + deepfm explain, tune_process, and the three of "Reading logs where they are"
    assert sum(b.lang in ("bash", "python") and b.skip is None for b in found) == 12


@pytest.mark.slow
def test_every_snippet_runs_as_written(tmp_path):
    if not (VENV / "bin" / "deepfm").exists():
        pytest.skip("needs the project's virtual environment (make setup)")
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copytree(ROOT / "examples", work / "examples", ignore=shutil.ignore_patterns(".cache"))
    for name in ("Makefile", "pyproject.toml", "tests/s3server.py", "bench/ingest_two_hosts.sh",
                 "bench/netns_pair.sh"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, work / name)
    (work / ".venv").symlink_to(VENV)
    stamp = (VENV / "bin" / "deepfm").stat().st_mtime  # make: the environment is set up (as after `make setup`)
    os.utime(work / "pyproject.toml", (stamp - 10, stamp - 10))
    port = str(models.free_port())
    env = dict(os.environ, PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    outputs: dict[str, str] = {}
    servers: list[subprocess.Popen] = []
    try:
        for i, b in enumerate(blocks()):
            where = f"{b.doc}:{b.line}"
            body = b.body.replace(":8000", f":{port}").replace("--port 8000", f"--port {port}")
            if b.skip is not None or b.lang in ("text", ""):
                continue
            if b.lang == "json":
                json.loads(body)
            elif b.lang == "yaml":
                assert isinstance(yaml.safe_load(body), dict), where
            elif b.lang == "bash" and body.lstrip().startswith("deepfm serve"):
                log = open(tmp_path / f"server{i}.log", "w")  # noqa: SIM115
                servers.append(subprocess.Popen(["bash", "-c", body], cwd=work, env=env, stdout=log,
                                                stderr=subprocess.STDOUT, start_new_session=True))
                _wait_for(int(port), servers[-1], tmp_path / f"server{i}.log")
            else:
                cmd = ["bash", "-eu", "-o", "pipefail", "-c", body] if b.lang == "bash" else \
                    [str(VENV / "bin" / "python"), "-c", body]
                proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
                assert proc.returncode == 0, f"{where} failed:\n{body}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
                outputs[where] = proc.stdout
    finally:
        for s in servers:
            os.killpg(s.pid, 15)
            s.wait(timeout=20)
    text = "\n".join(outputs.values())
    # what the snippets promise
    assert (work / "runs" / "criteo" / "model.safetensors").is_file()
    assert len((work / "runs" / "criteo-predictions.csv").read_text().splitlines()) == 391 + 1
    curl = next(out for out in outputs.values() if '"predictions"' in out)
    reply = json.loads(curl[:curl.index("}]}") + 3])
    assert reply["predictions"][0]["id"] == "imp-1" and 0 < reply["predictions"][0]["probability"] < 1
    assert (work / "runs" / "criteo" / "export" / "model.onnx").is_file()
    assert re.search(r"test AUC 0\.[5-9]\d{3}", text)
    assert (work / "runs" / "api-model" / "model.safetensors").is_file()
    for name in ("criteo-parts", "criteo-s3", "two-hosts/node0/model"):  # logs read where they are
        assert (work / "runs" / name / "model.safetensors").is_file(), name
    assert re.search(r"^\[0\.\d+\]$", text, re.M)  # the ONNX snippet's one probability


def _wait_for(port: int, proc: subprocess.Popen, log: Path) -> None:
    import httpx

    for _ in range(600):
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                assert "Serving runs/criteo on http://127.0.0.1:" in log.read_text()
                return
        except httpx.TransportError:
            time.sleep(0.2)
    pytest.fail(f"the server did not start: {log.read_text()}")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
