#!/usr/bin/env python3
"""TCP forwarding between this process's network namespace and another one.

    nsforward.py NETNS_PATH SPEC...

SPEC is `to-ns:ADDR:PORT=ADDR:PORT` (listen in this process's namespace, connect from inside
NETNS_PATH) or `from-ns:ADDR:PORT=ADDR:PORT` (listen inside NETNS_PATH, connect from here).

scripts/env.sh uses `to-ns` to reach the network namespace it runs the environment in: the
host's loopback ports of the API server, Kafka and the S3 gateway lead to the same ports inside. Sockets keep the namespace they were created in, so one
single-threaded process holds listeners and connections of both: it enters a namespace with
setns(2) only around socket(2).
"""
import asyncio
import ctypes
import os
import socket
import sys

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
HERE = os.open("/proc/self/ns/net", os.O_RDONLY)


def setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in(ns_fd):
    """A TCP socket created in the namespace ns_fd (None: this process's own)."""
    if ns_fd is None:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    setns(ns_fd)
    try:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    finally:
        setns(HERE)


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            pass


async def serve(listen_ns, listen, connect_ns, target):
    lsock = socket_in(listen_ns)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(listen)
    lsock.listen(512)
    lsock.setblocking(False)
    loop = asyncio.get_running_loop()

    async def handle(cr, cw):
        sock = socket_in(connect_ns)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, target)
        except OSError:
            sock.close()
            cw.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cw.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tr, tw = await asyncio.open_connection(sock=sock)
        await asyncio.gather(pipe(cr, tw), pipe(tr, cw))
        cw.close()
        tw.close()

    server = await asyncio.start_server(handle, sock=lsock)
    async with server:
        await server.serve_forever()


def addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


async def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    ns = os.open(argv[0], os.O_RDONLY)
    tasks = []
    for spec in argv[1:]:
        side, rest = spec.split(":", 1)
        listen, target = rest.split("=", 1)
        if side == "from-ns":
            tasks.append(serve(ns, addr(listen), None, addr(target)))
        elif side == "to-ns":
            tasks.append(serve(None, addr(listen), ns, addr(target)))
        else:
            sys.exit(f"bad spec {spec!r}: want to-ns:ADDR:PORT=ADDR:PORT or from-ns:ADDR:PORT=ADDR:PORT")
    print(f"forwarding {' '.join(argv[1:])} (namespace {argv[0]})", flush=True)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
