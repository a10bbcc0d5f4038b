"""A throw-away RabbitMQ cluster of three nodes on this machine, for the cluster tests.

Each node has a node name of its own (``qfc<run>-<i>@localhost``), its own AMQP and
distribution ports, and its own data and log folders and configuration file under the test's
temporary folder; the nodes share an Erlang cookie (a ``HOME`` of their own). Nodes 2 and 3
join node 1 (``rabbitmqctl stop_app / join_cluster / start_app``). Plugins are off. The
machine's own broker (``rabbit@localhost``, 127.0.0.1:5672) is never touched: its node name,
ports and folders are not used, and its configuration file is not read.

:meth:`RabbitCluster.stop` stops every node and kills what is left by its process id; the
fixture that starts a cluster calls it whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Where Debian keeps the real scripts (the ones on PATH switch to the rabbitmq user).
DEBIAN_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
COOKIE = "QFLARECLUSTERTESTCOOKIE"
PORT_RANGE = (21000, 29000)  # below the ephemeral range; 25672 (the default dist port) skipped


def scripts_dir() -> Path | None:
    """The folder of ``rabbitmq-server`` and ``rabbitmqctl`` that run as the caller."""
    if (DEBIAN_SCRIPTS / "rabbitmq-server").exists():
        return DEBIAN_SCRIPTS
    found = shutil.which("rabbitmq-server")
    return Path(found).resolve().parent if found else None


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    candidates = list(range(*PORT_RANGE))
    random.shuffle(candidates)
    for port in candidates:
        if port == 25672:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free ports for the cluster")


@dataclass
class Node:
    name: str
    amqp_port: int
    dist_port: int
    base: Path
    proc: subprocess.Popen[bytes] | None = None
    killed: bool = False

    @property
    def pid_file(self) -> Path:
        return self.base / "pid"

    def pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None


@dataclass
class RabbitCluster:
    root: Path
    size: int = 3
    user: str = "guest"
    password: str = "guest"
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        scripts = scripts_dir()
        if scripts is None:
            raise RuntimeError("rabbitmq-server is not installed")
        self.scripts = scripts
        run = uuid.uuid4().hex[:6]
        ports = _free_ports(2 * self.size)
        for i in range(self.size):
            base = self.root / f"node{i + 1}"
            self.nodes.append(
                Node(f"qfc{run}-{i + 1}@localhost", ports[2 * i], ports[2 * i + 1], base)
            )
        home = self.root / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(COOKIE)
        cookie.chmod(0o400)
        self.home = home

    # -- addresses ---------------------------------------------------------------------------
    def url(self, i: int) -> str:
        return f"amqp://{self.user}:{self.password}@127.0.0.1:{self.nodes[i].amqp_port}/"

    @property
    def urls(self) -> str:
        """Every node's URL, comma-separated: what ``QFLARE_BROKER`` takes for a cluster."""
        return ",".join(self.url(i) for i in range(self.size))

    # -- life cycle --------------------------------------------------------------------------
    def _env(self, node: Node | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env["HOME"] = str(self.home)
        if node is not None:
            config = node.base / "rabbitmq.conf"
            plugins = node.base / "enabled_plugins"
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(node.amqp_port),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_CONFIG_FILE=str(config),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(plugins),
                RABBITMQ_MNESIA_BASE=str(node.base / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.base / "log"),
                RABBITMQ_PID_FILE=str(node.pid_file),
            )
        return env

    def start(self, timeout: float = 120.0) -> None:
        for node in self.nodes:
            node.base.mkdir(parents=True, exist_ok=True)
            (node.base / "rabbitmq.conf").write_text(
                f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}\n"
                "loopback_users = none\n"
                # what RabbitMQ recommends for three nodes: a minority side pauses
                "cluster_partition_handling = pause_minority\n"
            )
            (node.base / "enabled_plugins").write_text("[].\n")
            out = open(node.base / "server.out", "wb")  # noqa: SIM115  (the node's lifetime)
            node.proc = subprocess.Popen(
                [str(self.scripts / "rabbitmq-server")],
                env=self._env(node),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=node.base,
                start_new_session=True,
            )
        for node in self.nodes:
            self._await_startup(node, timeout)
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", self.nodes[0].name)
            self.ctl(node, "start_app")
        running = self.running_nodes()
        if sorted(running) != sorted(n.name for n in self.nodes):
            raise RuntimeError(f"cluster did not form: running {running}")

    def _await_startup(self, node: Node, timeout: float) -> None:
        end = time.monotonic() + timeout
        while True:
            assert node.proc is not None
            if node.proc.poll() is not None:
                raise RuntimeError(
                    f"{node.name} exited with {node.proc.returncode}: "
                    f"{(node.base / 'server.out').read_text(errors='replace')[-2000:]}"
                )
            result = self.ctl(node, "await_startup", "--timeout", "10", check=False)
            if result.returncode == 0:
                return
            if time.monotonic() > end:
                raise RuntimeError(f"{node.name} did not start in {timeout}s: {result.stderr}")
            time.sleep(0.5)

    def ctl(
        self, node: Node, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.scripts / "rabbitmqctl"), "-n", node.name, *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {node.name} {' '.join(args)}: {result.stderr}")
        return result

    def live(self) -> Node:
        return next(n for n in self.nodes if not n.killed)

    def running_nodes(self) -> list[str]:
        out = self.ctl(self.live(), "cluster_status", "--formatter", "json").stdout
        return list(json.loads(out)["running_nodes"])

    def queues(self) -> list[dict[str, Any]]:
        """Every queue and stream of the cluster, with its type, members and leader."""
        out = self.ctl(
            self.live(),
            "list_queues",
            "name",
            "type",
            "members",
            "leader",
            "--formatter",
            "json",
        ).stdout
        return list(json.loads(out))

    def connections(self) -> list[dict[str, Any]]:
        """Every client connection: its name (``connection_name``) and the server port,
        which says the node it is on."""
        out = self.ctl(
            self.live(), "list_connections", "client_properties", "port", "--formatter", "json"
        ).stdout
        rows = []
        for row in json.loads(out):
            props = row.get("client_properties") or []
            name = next((p[2] for p in props if p and p[0] == "connection_name"), None)
            rows.append({"name": name, "port": row.get("port")})
        return rows

    def node_of_port(self, port: int) -> int:
        return next(i for i, n in enumerate(self.nodes) if n.amqp_port == port)

    def kill9(self, i: int) -> float:
        """``kill -9`` node ``i`` (its Erlang VM); returns the monotonic time of the kill."""
        node = self.nodes[i]
        pid = node.pid()
        if pid is None:
            raise RuntimeError(f"no pid file for {node.name}")
        os.kill(pid, signal.SIGKILL)
        at = time.monotonic()
        node.killed = True
        return at

    def stop(self) -> None:
        """Stop every node, kill what is left, unregister nothing else, remove the folders."""
        for node in self.nodes:
            if node.proc is None:
                continue
            if not node.killed and node.proc.poll() is None:
                self.ctl(node, "stop", check=False, timeout=60)
            pid = node.pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
