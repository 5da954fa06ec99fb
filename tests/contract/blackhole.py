"""A loopback TCP proxy that can turn into a black hole: after `cut()` bytes are read and dropped, nothing is closed.

That is what a dead route or a silent firewall does to a database connection: no RST, no FIN,
no error, just silence in both directions.
"""

from __future__ import annotations

import socket
import threading


class Blackhole:
    def __init__(self, target_port: int, listen_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = listen_port
        self.cut_off = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", listen_port))
        self._socks: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True, name="blackhole-accept").start()

    def upstream_ports(self) -> set[int]:
        """The local ports of the proxy's connections to the server (pg_stat_activity's client_port)."""
        ports = set()
        for s in self._socks[1:]:
            try:
                if s.getpeername()[1] == self.target[1]:
                    ports.add(int(s.getsockname()[1]))
            except OSError:  # closed, or a client's socket whose peer has gone
                continue
        return ports

    def cut(self) -> None:
        self.cut_off.set()

    def heal(self) -> None:
        """The route is back: the connections open during the cut stay dead (shut down now: what TCP would end in
        after retransmitting into the void), new ones pass again."""
        old, self._socks = self._socks[1:], self._socks[:1]
        for s in old:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self.cut_off.clear()

    def close(self) -> None:
        # shutdown first: close() alone does not wake the accept thread blocked on the listener, and the kernel keeps
        # a socket listening while a call is blocked on it, so the next proxy on this port would fail with EADDRINUSE
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the server is down (a restart): the client is refused too, as without the proxy
                client.close()
                continue
            self._socks += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True, name="blackhole-pipe").start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                if not self.cut_off.is_set():
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                return
            if self.cut_off.is_set():
                continue  # swallowed: the peer hears nothing, not even a close
            try:
                dst.sendall(data)
            except OSError:
                return
