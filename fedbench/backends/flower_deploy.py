"""flower-deploy: the same ServerApp and ClientApp as a real Flower deployment.

``fedbench run --backend flower-deploy`` starts, on this machine's loopback, a SuperLink and one
SuperNode process per client (``--node-config "partition-id=i num-partitions=N"``), submits the
app in ``flower_app/`` with ``flwr run`` (its components are :data:`server_app` here and
:data:`fedbench.backends.flower.client_app`; the run config names the protocol file and the
results directory), waits for the run to finish, and stops every process it started. Across
machines the user starts the SuperLink and the SuperNodes (with TLS) and runs ``flwr run``
themselves: see the README.

Flower 1.42 starts a ClientApp process per message, so every message re-imports torch and re-stages
the seed's data on the node: correct, and slow (seconds per message); it is the deployment path,
not the fast one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedbench.backends import BackendError
from fedbench.backends.flower import FlowerBackend, quiet_flower
from fedbench.config import toml_file
from fedbench.config.protocol import Protocol
from fedbench.runtime.backend import Progress
from fedbench.runtime.rows import RowsFailed, recorded_failures, run_rows

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import Context
from flwr.serverapp import ServerApp

APP_DIR = Path(__file__).with_name("flower_app")
FEDERATION = "fedbench"  # the SuperLink connection's name in $FLWR_HOME/config.toml
DONE = ("finished:completed", "finished:failed", "finished:stopped")

server_app = ServerApp()


@server_app.main()
def _main(grid: Any, context: Context) -> None:
    """Every row x seed of the protocol file ``run_config["protocol"]`` into ``run_config["results"]``."""
    quiet_flower()
    protocol = toml_file.load(str(context.run_config["protocol"]))
    results = Path(str(context.run_config["results"]))
    run_rows(protocol, results, backend=lambda run: FlowerBackend(grid, "flower-deploy", run))


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise BackendError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s (Flower process failed to start)")


class LocalDeployment:
    """A SuperLink and ``num_nodes`` SuperNodes on loopback, each in its own process group; the
    ``flwr`` CLI talks to them through ``$FLWR_HOME`` (a fresh directory under ``workdir``)."""

    def __init__(self, num_nodes: int, workdir: Path) -> None:
        self.num_nodes, self.workdir = num_nodes, Path(workdir)
        self.home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.procs: dict[str, subprocess.Popen] = {}
        self.port, *self.node_ports = _free_ports(num_nodes + 1)
        # the caller's torch thread count for every process, so a deployment on this machine computes
        # exactly what the in-process backend computes (and records the same device)
        threads = str(torch.get_num_threads())
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "OMP_NUM_THREADS": threads,
        }

    def __enter__(self) -> LocalDeployment:
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FEDERATION}"\n\n'
            f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        try:
            link = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.port)]
            self._start("superlink", [*link, "--disable-runtime-dependency-installation"])
            _wait_port(self.port)
            for i in range(self.num_nodes):
                self.start_node(i)
            for port in self.node_ports:
                _wait_port(port)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self, name: str, cmd: list[str]) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    def start_node(self, i: int) -> None:
        state = self.workdir / "node-states" / f"node{i}"
        config = f'partition-id={i} num-partitions={self.num_nodes} state-dir="{state}"'
        cmd = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}"]
        self._start(f"node{i}", [*cmd, "--node-config", config, "--port", str(self.node_ports[i])])

    def kill_node(self, i: int, sig: int = signal.SIGTERM) -> None:
        """Kill SuperNode ``i`` and the ClientApp it runs (its process group)."""
        proc = self.procs.pop(f"node{i}")
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)

    def stop(self) -> None:
        """SuperNodes first, the SuperLink last; SIGKILL whatever SIGTERM did not end in 20 s."""
        for name in sorted(self.procs, key=lambda n: n == "superlink"):
            proc = self.procs.pop(name)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except ProcessLookupError:
                continue
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def flwr(self, *args: str) -> str:
        out = subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise BackendError(f"`flwr {' '.join(args[:2])}` failed: {(out.stderr or out.stdout).strip()[-400:]}")
        return out.stdout

    def submit(self, protocol_file: Path, results: Path) -> int:
        overrides = ["-c", f'protocol="{protocol_file}"', "-c", f'results="{results}"']
        reply = json.loads(self.flwr("run", str(APP_DIR), FEDERATION, "--format", "json", *overrides))
        if not reply.get("success"):
            raise BackendError(f"the SuperLink refused the run: {reply}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> str:
        reply = json.loads(self.flwr("ls", FEDERATION, "--run-id", str(run_id), "--format", "json"))
        return str(reply["runs"][0]["status"])

    def wait(self, run_id: int, timeout: float, poll: Callable[[], None] | None = None) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status in DONE:
                return status
            if poll is not None:
                poll()
            time.sleep(1.0)
        return f"timeout after {timeout:.0f} s"

    def log(self, run_id: int) -> str:
        try:
            return self.flwr("log", str(run_id), FEDERATION, "--show")
        except BackendError as err:
            return str(err)


def write_protocol(protocol: Protocol, results: Path) -> Path:
    """The protocol as the ServerApp will read it (a TOML file in the results directory)."""
    path = results / "flower-deploy" / "protocol.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_file.to_toml(protocol))
    return path


def run_flower_deploy(
    protocol: Protocol, results: Path, progress: Progress, on_seed: Callable[[Any], None] | None = None
) -> None:
    """Every row x seed on a loopback deployment (one SuperNode per client); raises with the
    ServerApp's log when the run does not complete."""
    results = Path(results).resolve()
    protocol_file = write_protocol(protocol, results)
    with (
        tempfile.TemporaryDirectory(prefix="fedbench-deploy-") as work,
        LocalDeployment(protocol.data.num_clients, Path(work)) as cluster,
    ):
        run_id = cluster.submit(protocol_file, results)
        progress("deploy", {"run_id": run_id})
        status = cluster.wait(run_id, timeout=24 * 3600)
        failures = recorded_failures(results, protocol) if status == "finished:failed" else []
        if failures:  # the ServerApp ran every row and raised RowsFailed at the end
            raise RowsFailed(failures)
        if status != "finished:completed":
            raise BackendError(f"flower-deploy run {run_id} ended {status}: {cluster.log(run_id).strip()[-1500:]}")
