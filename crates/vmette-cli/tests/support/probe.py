#!/usr/bin/env python3
"""The guest's side of the egress tests (netlab.rs shares it at /lab).

Each argument `LABEL=PROBE ARG...` runs one probe, in order, and prints
`LABEL: OUTCOME`. A probe that fails says how: refused, reset, closed (an
orderly close), timeout, or the exception's name.

  connect ADDRESS PORT   a TCP connection, nothing sent: connected or how
                         it failed
  line ADDRESS PORT      the first line the TCP server sends
  tls ADDRESS SNI|-      a TLS handshake (the lab's CA) naming SNI, or none
                         for -, then GET /tls: the answer's body
  split ADDRESS SNI      a ClientHello naming SNI, sent in three TCP
                         segments cut inside the name: server-hello when
                         the server answers
  keepalive ADDRESS HOST GET /first with Host allowed.test, then GET
                         /second with Host HOST on the same connection:
                         `STATUS BODY; then answered|closed|...` (answered:
                         the server's answer to the second)
  udp ADDRESS PORT SIZE  a datagram of SIZE bytes starting 0xc0 (a QUIC
                         long header's first byte): none when nothing
                         answers
  bigquery NAME          a DNS query for NAME padded past 1024 bytes (an
                         EDNS padding option) to the resolver: its rcode
"""

import os
import socket
import ssl
import struct
import sys
import time

# The lab's CA certificate, shared beside this file.
CA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ca.pem")
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}


def failure(error):
    if isinstance(error, ConnectionRefusedError):
        return "refused"
    if isinstance(error, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "closed"
    if isinstance(error, TimeoutError):
        return "timeout"
    return type(error).__name__


def connect(address, port):
    sock = socket.create_connection((address, int(port)), 5)
    sock.close()
    return "connected"


def line(address, port):
    with socket.create_connection((address, int(port)), 5) as sock:
        data = sock.makefile("rb").readline()
    return data.decode(errors="replace").strip() or "closed"


def tls(address, sni):
    context = ssl.create_default_context(cafile=CA)
    # Without SNI there is no name to check the certificate against.
    context.check_hostname = sni != "-"
    sock = socket.create_connection((address, 443), 5)
    with context.wrap_socket(sock, server_hostname=None if sni == "-" else sni) as tls:
        tls.sendall(b"GET /tls HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := tls.recv(4096):
            answer += chunk
    return answer.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip() or "closed"


def split(address, sni):
    # The ClientHello's bytes, from a TLS client that writes to memory.
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context(cafile=CA).wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    at = hello.index(sni.encode())
    cuts = [hello[: at + 3], hello[at + 3 : at + 6], hello[at + 6 :]]
    sock = socket.create_connection((address, 443), 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with sock:
        for cut in cuts:
            sock.sendall(cut)
            time.sleep(0.3)
        answer = sock.recv(5)
    # A ServerHello comes in a handshake record (type 22).
    if answer[:1] == b"\x16":
        return "server-hello"
    return "closed" if not answer else f"answered {answer.hex()}"


def response(reader):
    """`STATUS BODY` of the next answer on a connection, closed if none."""
    status = reader.readline().split()
    if not status:
        return "closed"
    length = 0
    while (header := reader.readline().strip()) != b"":
        name, _, value = header.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = reader.read(length).decode(errors="replace").strip()
    return f"{status[1].decode() if len(status) > 1 else '?'} {body}"


def keepalive(address, host):
    sock = socket.create_connection((address, 80), 5)
    with sock:
        reader = sock.makefile("rb")
        sock.sendall(b"GET /first HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        first = response(reader)
        sock.sendall(f"GET /second HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        try:
            second = response(reader)
        except OSError as e:
            second = failure(e)
    # The server's answer says hello; anything else is the stack's.
    return f"{first}; then {'answered' if 'hello from' in second else second}"


def udp(address, port, size):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(1)
    with sock:
        sock.sendto(b"\xc0" + bytes(int(size) - 1), (address, int(port)))
        try:
            sock.recv(2048)
        except TimeoutError:
            return "none"
    return "answered"


def resolver():
    with open("/etc/resolv.conf") as conf:
        for entry in conf:
            if entry.startswith("nameserver"):
                return entry.split()[1]
    raise OSError("no nameserver in /etc/resolv.conf")


def bigquery(name):
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    padding = bytes(1100)
    option = struct.pack("!HH", 12, len(padding)) + padding
    opt = b"\x00" + struct.pack("!HHIH", 41, 4096, 0, len(option)) + option
    query = struct.pack("!HHHHHH", 0x5EC7, 0x0100, 1, 0, 0, 1) + question + struct.pack("!HH", 1, 1) + opt
    assert len(query) > 1024
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    with sock:
        sock.sendto(query, (resolver(), 53))
        answer = sock.recv(4096)
    rcode = answer[3] & 0xF
    return RCODES.get(rcode, str(rcode))


PROBES = {
    "connect": connect,
    "line": line,
    "tls": tls,
    "split": split,
    "keepalive": keepalive,
    "udp": udp,
    "bigquery": bigquery,
}

if __name__ == "__main__":
    for argument in sys.argv[1:]:
        label, _, probe = argument.partition("=")
        kind, *args = probe.split()
        try:
            outcome = PROBES[kind](*args)
        except (OSError, ssl.SSLError, ValueError) as e:
            outcome = failure(e)
        print(f"{label}: {outcome}", flush=True)
