"""The stand-in's TCP store: rank 0 serves it (a thread; CuPy's is a child process), every rank
sends its part of a collective and gets all the ranks' parts back once each has sent one."""
from __future__ import annotations

import atexit
import threading
from multiprocessing.connection import Client, Listener

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 13333  # cupyx/distributed/_store.py's
AUTHKEY = b"gpunet-standin-nccl"


class Server:
    def __init__(self, world_size: int, host: str, port: int):
        self.world_size = world_size
        self._listener = Listener((host, port), backlog=64, authkey=AUTHKEY)  # OSError when the port is taken
        self.address = self._listener.address
        self._parts: dict = {}  # sequence -> {rank: payload}
        self._taken: dict = {}  # sequence -> ranks that got the parts back
        self._changed = threading.Condition()
        self._answering: list[threading.Thread] = []
        threading.Thread(target=self._serve, daemon=True).start()
        # Collectives travel through this store (NCCL's do not): rank 0 may finish its last collective
        # and exit while the answer to another rank is still unsent, which would leave that rank waiting
        # forever. So the serving process waits, at exit, for the answers it owes (at most 30 s).
        atexit.register(self._finish_answers)

    def _serve(self):
        while True:
            try:
                connection = self._listener.accept()
            except OSError:  # closed by stop()
                return
            thread = threading.Thread(target=self._answer, args=(connection,), daemon=True)
            self._answering = [t for t in self._answering if t.is_alive()] + [thread]
            thread.start()

    def _finish_answers(self, timeout: float = 30.0):
        for thread in list(self._answering):
            thread.join(timeout)

    def _answer(self, connection):
        with connection:
            sequence, rank, payload = connection.recv()
            with self._changed:
                self._parts.setdefault(sequence, {})[rank] = payload
                self._changed.notify_all()
                self._changed.wait_for(lambda: len(self._parts[sequence]) == self.world_size)
                parts = self._parts[sequence]
                self._taken.setdefault(sequence, set()).add(rank)
                if len(self._taken[sequence]) == self.world_size:
                    del self._parts[sequence], self._taken[sequence]
            connection.send([parts[r] for r in range(self.world_size)])

    def stop(self):
        self._listener.close()


class Proxy:
    def __init__(self, address, timeout: float):
        self.address, self.timeout = tuple(address), timeout

    def exchange(self, sequence: int, rank: int, payload):
        import time

        deadline = time.monotonic() + self.timeout
        while True:
            try:
                connection = Client(self.address, authkey=AUTHKEY)
                break
            except ConnectionRefusedError:  # rank 0 has not started the store yet
                if time.monotonic() > deadline:
                    raise RuntimeError(f"TCPStore is not available at {self.address[0]}:{self.address[1]}") from None
                time.sleep(0.1)
        with connection:
            connection.send((sequence, rank, payload))
            if not connection.poll(self.timeout):
                raise RuntimeError(f"rank {rank}: collective {sequence} waited {self.timeout:g} s for the other ranks")
            return connection.recv()
