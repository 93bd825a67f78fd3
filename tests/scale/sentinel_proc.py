"""A master, a replica and three sentinels on free loopback ports, for fail-over tests."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from redis_server_proc import REDIS_SERVER, _free_port, _ping

SERVICE = "pyquant-main"


def _ask(port: int, command: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(command)
        time.sleep(0.05)
        return sock.recv(65536)


@dataclass
class Node:
    """One redis-server process (a data node or a sentinel)."""

    directory: Path
    args: list[str]
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> None:
        assert REDIS_SERVER is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [REDIS_SERVER, *self.args],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while not _ping(self.port):
            if self.process.poll() is not None:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.01)

    def kill9(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


def data_node(directory: Path, replica_of: int | None = None) -> Node:
    node = Node(directory, [])
    node.args = [
        "--port", str(node.port),
        "--bind", "127.0.0.1",
        "--dir", str(directory),
        "--save", "",
        "--appendonly", "no",
        "--logfile", str(directory / "redis.log"),
        "--daemonize", "no",
    ]  # fmt: skip
    if replica_of is not None:
        node.args += ["--replicaof", "127.0.0.1", str(replica_of)]
    return node


def sentinel_node(directory: Path, master_port: int) -> Node:
    directory.mkdir(parents=True, exist_ok=True)
    node = Node(directory, [])
    conf = directory / "sentinel.conf"
    conf.write_text(
        f"port {node.port}\n"
        "bind 127.0.0.1\n"
        f"dir {directory}\n"
        f"logfile {directory / 'redis.log'}\n"
        f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2\n"
        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        f"sentinel failover-timeout {SERVICE} 4000\n"
        f"sentinel parallel-syncs {SERVICE} 1\n"
    )
    node.args = [str(conf), "--sentinel"]
    return node


@dataclass
class SentinelCluster:
    """master + replica + three sentinels; ``url`` is pyquant's sentinel URL for them."""

    root: Path
    master: Node = field(init=False)
    replica: Node = field(init=False)
    sentinels: list[Node] = field(init=False)

    def start(self) -> None:
        self.master = data_node(self.root / "master")
        self.master.start()
        self.replica = data_node(self.root / "replica", replica_of=self.master.port)
        self.replica.start()
        self.sentinels = [sentinel_node(self.root / f"s{i}", self.master.port) for i in range(3)]
        for node in self.sentinels:
            node.start()
        self._wait(
            lambda: b"master_link_status:up" in _ask(self.replica.port, b"INFO replication\r\n")
        )
        # Every sentinel must know the replica (and its peers) before a fail-over can elect.
        self._wait(
            lambda: all(
                b"slaves=1" in _ask(s.port, b"INFO sentinel\r\n")
                and b"sentinels=3" in _ask(s.port, b"INFO sentinel\r\n")
                for s in self.sentinels
            ),
            timeout_s=30,
        )

    @staticmethod
    def _wait(predicate, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise RuntimeError("sentinel cluster not ready in time")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/0?service={SERVICE}"

    def master_port(self) -> int:
        reply = _ask(
            self.sentinels[0].port,
            f"SENTINEL get-master-addr-by-name {SERVICE}\r\n".encode(),
        )
        return int(reply.split(b"\r\n")[-2])

    def stop(self) -> None:
        for node in [*getattr(self, "sentinels", []), getattr(self, "replica", None),
                     getattr(self, "master", None)]:  # fmt: skip
            if node is not None:
                node.kill9()
