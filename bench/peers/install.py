"""The framework peers' virtual environments: made once from their pinned requirements, reused after.

    python -m bench.peers.install [--force]

``make bench-peers`` runs this (``make bench`` depends on it); :class:`bench.targets.RayServePeer` calls
:func:`ensure` too, so ``python -m bench`` alone also installs on first use. A stamp file holds the
requirements text the environment was made from: when the requirements change, the environment is
made again. The pip log goes beside the stamp. Standard library only.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger("bench.peers")
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class PeerEnv:
    name: str
    requirements: Path
    root: Path  # .cache/peers/<name>/: venv/, installed.txt (the stamp), install.log

    @property
    def venv(self) -> Path:
        return self.root / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def stamp(self) -> Path:
        return self.root / "installed.txt"

    @property
    def log(self) -> Path:
        return self.root / "install.log"

    def installed(self) -> bool:
        return (self.python.exists() and self.stamp.exists()
                and self.stamp.read_text() == self.requirements.read_text())


RAY = PeerEnv("ray", REPO_ROOT / "bench" / "peers" / "ray-requirements.txt", REPO_ROOT / ".cache" / "peers" / "ray")
PEERS = {"ray": RAY}


def ensure(peer: PeerEnv, force: bool = False) -> Path:
    """The peer's interpreter, its environment made first when missing or stale."""
    if peer.installed() and not force:
        LOG.info("%s peer: environment %s is up to date with %s", peer.name, peer.venv,
                 peer.requirements.relative_to(REPO_ROOT))
        return peer.python
    LOG.info("%s peer: installing %s into %s (once; pip log in %s) ...", peer.name,
             peer.requirements.relative_to(REPO_ROOT), peer.venv, peer.log)
    started = time.perf_counter()
    peer.stamp.unlink(missing_ok=True)
    shutil.rmtree(peer.venv, ignore_errors=True)
    peer.root.mkdir(parents=True, exist_ok=True)
    with open(peer.log, "w") as log:
        for command in ([sys.executable, "-m", "venv", str(peer.venv)],
                        [str(peer.python), "-m", "pip", "install", "--disable-pip-version-check", "-r",
                         str(peer.requirements)]):
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                raise RuntimeError(f"{peer.name} peer: `{' '.join(command)}` failed; see {peer.log}")
    peer.stamp.write_text(peer.requirements.read_text())
    LOG.info("%s peer: installed in %.0f s", peer.name, time.perf_counter() - started)
    return peer.python


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", action="append", choices=sorted(PEERS), default=None,
                        help="peer to install, repeatable (default: all)")
    parser.add_argument("--force", action="store_true", help="make the environment again (default: only if stale)")
    return parser


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in args.peer or sorted(PEERS):
        ensure(PEERS[name], force=args.force)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
