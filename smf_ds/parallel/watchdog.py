"""Peers that die or hang must not hang a job.

Collectives wait for every rank, and a rank that was killed (kill -9, the OOM killer) or stopped
(SIGSTOP, a node that froze) would keep the others waiting until torch's collective timeout. Each
rank therefore beats a heartbeat counter in the rendezvous store (from a thread, so a rank that
computes or writes a checkpoint for a long time still beats). Rank 0 watches every counter, and
every other rank watches rank 0's (O(ranks) store requests per interval in all): a peer whose
counter has not moved for `cluster.collective_timeout` seconds, or that is gone from this host
without saying goodbye, is lost. Rank 0 posts the verdict in the store, every rank reads it, logs
which rank was lost (host, pid, and on the same host whether it exited or is stopped) and exits
PEER_LOST_EXIT_CODE; the launcher then ends the job. A rank finds rank 0 lost when its counter
stands still or the store (rank 0's) cannot be reached.
The process group's own timeout is the same number of seconds, for a peer that is alive but
stuck inside a collective.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger(__name__)

PEER_LOST_EXIT_CODE = 69  # EX_UNAVAILABLE (sysexits.h): a peer the job needs is gone
_PREFIX = "smf_ds/peers"
_LOST = f"{_PREFIX}/lost"


def _machine() -> str:
    """This boot of this machine and its PID namespace: two ranks with the same value can read each
    other's /proc (the same hostname alone is not enough, in containers)."""
    try:
        boot = open("/proc/sys/kernel/random/boot_id").read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return f"{socket.gethostname()}/unknown"


def _process_state(pid: int) -> str | None:
    """'exited', 'stopped' or None (running) for a process on this host."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "exited"
    return {"Z": "exited", "X": "exited", "T": "stopped", "t": "stopped"}.get(state)


class PeerWatch:
    """Heartbeats of this rank, and the verdict on every other (see the module doc)."""

    def __init__(self, rank: int, world: int, timeout: float, host: str, port: int) -> None:
        self.rank, self.world, self.timeout = rank, world, timeout
        self.interval = min(5.0, max(0.2, timeout / 10))
        self.store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=max(timeout, 30)),
                                   wait_for_workers=False)
        self.hostname = socket.gethostname()
        self.machine = _machine()
        self.store.set(f"{_PREFIX}/who/{rank}", json.dumps({"host": self.hostname, "pid": os.getpid(),
                                                           "machine": self.machine}))
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (last count, when it last moved)
        self._who: dict[int, dict] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="smf-ds peer watch", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.store.add(f"{_PREFIX}/beat/{self.rank}", 1)

    def _whois(self, rank: int) -> dict:
        if rank not in self._who and self.store.check([f"{_PREFIX}/who/{rank}"]):
            self._who[rank] = json.loads(self.store.get(f"{_PREFIX}/who/{rank}"))
        return self._who.get(rank, {})

    def lost_peers(self, ranks=None) -> list[str]:
        """What is wrong with each lost peer of `ranks` (default: all), as a phrase naming it; [] when
        all answer."""
        now, lost = time.monotonic(), []
        for rank in range(self.world) if ranks is None else ranks:
            if rank == self.rank or self.store.check([f"{_PREFIX}/bye/{rank}"]):
                continue
            key = f"{_PREFIX}/beat/{rank}"
            count = int(self.store.get(key)) if self.store.check([key]) else 0
            last, moved = self._seen.get(rank, (None, now))
            if count != last:
                self._seen[rank] = (count, now)
                moved = now
            who = self._whois(rank)
            where = f"rank {rank} (pid {who.get('pid', '?')} on {who.get('host', '?')})"
            # /proc answers only for a process of this machine's PID namespace (not merely this hostname).
            state = _process_state(who["pid"]) if who.get("machine") == self.machine and "pid" in who else None
            if state == "exited":
                lost.append(f"{where} exited")
            elif now - moved > self.timeout:
                detail = "; it is stopped (SIGSTOP)" if state == "stopped" else ""
                lost.append(f"{where} has not answered for {now - moved:.0f} s{detail}")
        return lost

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self._beat()
                if self.store.check([_LOST]):  # rank 0's verdict
                    lost = [self.store.get(_LOST).decode()]
                elif self.rank == 0:
                    lost = self.lost_peers()
                    if lost:
                        self.store.set(_LOST, "; ".join(lost))
                else:
                    lost = self.lost_peers([0])
            except Exception as err:  # noqa: BLE001 - the store is rank 0's: it went with it
                if self._stopping.is_set():
                    return
                lost = [f"rank 0 (the rendezvous store's host) cannot be reached ({type(err).__name__}: {err})"]
            if lost and not self._stopping.is_set():
                self._exit(lost)

    def _exit(self, lost: list[str]) -> None:
        message = (f"rank {self.rank}: lost {'; '.join(lost)}; stopping this rank (exit {PEER_LOST_EXIT_CODE}) "
                   f"so that the job ends instead of waiting on it (cluster.collective_timeout={self.timeout:g} s). "
                   f"Resume from the latest checkpoint with --resume auto.")
        log.error(message)
        print(f"smf-ds: {message}", file=sys.stderr, flush=True)
        os._exit(PEER_LOST_EXIT_CODE)

    def diagnose(self, wait: float) -> list[str]:
        """After a collective failed: the lost peers, waiting up to `wait` s for the verdict."""
        deadline = time.monotonic() + wait
        while True:
            try:
                lost = self.lost_peers()
            except Exception as err:  # noqa: BLE001
                return [f"rank 0 (the rendezvous store's host) cannot be reached ({type(err).__name__})"]
            if lost or time.monotonic() >= deadline:
                return lost
            time.sleep(self.interval)

    def close(self) -> None:
        """A clean leave: the peers must not count this rank as lost once it exits."""
        self._stopping.set()
        self._thread.join(timeout=self.interval * 2 + 1)
        try:
            self.store.set(f"{_PREFIX}/bye/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - rank 0 may have left already: nobody is watching
            pass


WATCH: PeerWatch | None = None


def start(rank: int, world: int, timeout: float) -> PeerWatch:
    global WATCH
    WATCH = PeerWatch(rank, world, timeout, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    return WATCH


def stop() -> None:
    global WATCH
    if WATCH is not None:
        WATCH.close()
        WATCH = None
