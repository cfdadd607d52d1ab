#!/usr/bin/env python3
"""Test hosts for the network tests, run inside the tests' own namespaces.

  netlab.py dns ADDRESS LOG   a DNS server on ADDRESS:53 (UDP and TCP) that
                              answers the test names and logs every query
  netlab.py echo ADDRESS PORT a UDP echo server
  netlab.py watch IFACE LOG   logs every IPv4 packet that arrives on IFACE
                              (the stand-in for every address the tests name
                              and expect nothing to reach)
"""

import socket
import socketserver
import struct
import sys
import threading

# name -> ("A", address) or ("CNAME", target)
NAMES = {
    "web.test": ("A", "198.18.0.10"),
    "alias.test": ("CNAME", "web.test"),
    "loop.test": ("A", "127.0.0.1"),
    "meta.test": ("A", "169.254.169.254"),
    "private.test": ("A", "10.0.0.1"),
}


def log_line(path, line):
    with open(path, "a") as log:
        log.write(line + "\n")


def parse_question(packet):
    """The query's id, name, type and the question's bytes."""
    (ident,) = struct.unpack("!H", packet[:2])
    labels, offset = [], 12
    while True:
        length = packet[offset]
        if length == 0:
            offset += 1
            break
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length
    qtype, _qclass = struct.unpack("!HH", packet[offset : offset + 4])
    return ident, ".".join(labels).lower(), qtype, packet[12 : offset + 4]


def encode_name(name):
    out = b""
    for label in name.split("."):
        out += bytes([len(label)]) + label.encode("ascii")
    return out + b"\x00"


def answer(packet, log):
    ident, name, qtype, question = parse_question(packet)
    log_line(log, f"{name} {qtype}")
    records = []
    current = name
    while current in NAMES:
        kind, value = NAMES[current]
        if kind == "CNAME":
            rdata = encode_name(value)
            records.append(encode_name(current) + struct.pack("!HHIH", 5, 1, 30, len(rdata)) + rdata)
            current = value
            continue
        if qtype == 1:
            rdata = socket.inet_aton(value)
            records.append(encode_name(current) + struct.pack("!HHIH", 1, 1, 30, 4) + rdata)
        break
    rcode = 0 if name in NAMES else 3
    flags = 0x8180 | rcode
    header = struct.pack("!HHHHHH", ident, flags, 1, len(records), 0, 0)
    return header + question + b"".join(records)


def serve_dns(address, log):
    class Udp(socketserver.BaseRequestHandler):
        def handle(self):
            data, sock = self.request
            sock.sendto(answer(data, log), self.client_address)

    class Tcp(socketserver.StreamRequestHandler):
        def handle(self):
            while True:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return
                (length,) = struct.unpack("!H", head)
                reply = answer(self.rfile.read(length), log)
                self.wfile.write(struct.pack("!H", len(reply)) + reply)

    socketserver.ThreadingUDPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    udp = socketserver.ThreadingUDPServer((address, 53), Udp)
    tcp = socketserver.ThreadingTCPServer((address, 53), Tcp)
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    log_line(log, "ready")
    udp.serve_forever()


def echo(address, port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, int(port)))
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(b"echo:" + data, peer)


def watch(iface, log):
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0800))
    sock.bind((iface, 0))
    log_line(log, "ready")
    while True:
        frame = sock.recv(65535)
        ip = frame[14:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            continue
        proto = ip[9]
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        port = ""
        header = (ip[0] & 0xF) * 4
        if proto in (6, 17) and len(ip) >= header + 4:
            port = str(struct.unpack("!H", ip[header + 2 : header + 4])[0])
        log_line(log, f"{src} {dst} {proto} {port}")


if __name__ == "__main__":
    if sys.argv[1] == "dns":
        serve_dns(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "echo":
        echo(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "watch":
        watch(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
