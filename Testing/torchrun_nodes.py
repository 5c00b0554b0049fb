"""Run a script as two torchrun "nodes" on this machine, joined by the README's c10d rendezvous
flags (shared by the multi-node tests of train-seg and train-cls)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_two_nodes(script: Path, args: List[str], cwd: Path, rdzv_id: str,
                  timeout: float = 300.0) -> List[Tuple[int, str, str]]:
    """(return code, stdout, stderr) of each of two launchers of ``script args`` with
    ``--nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT``."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
           "--nproc_per_node", "1", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", rdzv_id,
           str(script), *args]
    nodes = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=cwd) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    return [(node.returncode, out, err) for node, (out, err) in zip(nodes, outputs)]
