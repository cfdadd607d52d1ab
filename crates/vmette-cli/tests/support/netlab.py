#!/usr/bin/env python3
"""Test hosts for the network tests, run inside the tests' own namespaces.

  netlab.py dns ADDRESS LOG   a DNS server on ADDRESS:53 (UDP and TCP) that
                              answers the test names and logs every query
  netlab.py echo ADDRESS PORT a UDP echo server
  netlab.py watch IFACE LOG   logs every IPv4 packet that arrives on IFACE
                              (the stand-in for every address the tests name
                              and expect nothing to reach)
  netlab.py web DIR ROOT CERT KEY ADDRESS...
                              on each ADDRESS, HTTP/1.1 on 80 and HTTPS on 443
                              serving ROOT; logs to DIR/web-ADDRESS.log:
                                http HOST METHOD PATH    a request on 80
                                tls SNI                  a handshake on 443
                                tls-failed SNI REASON    one that failed
                                https SNI METHOD PATH    a request on 443
                              (HOST and SNI are - when absent)
  netlab.py tcp LOG ADDRESS:PORT...
                              answers `hello from ADDRESS:PORT` to each
                              connection and logs `connect ADDRESS:PORT`
"""

import functools
import http.server
import os
import socket
import socketserver
import ssl
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
    # The egress allowlist's hosts (netlab.rs names their addresses).
    "allowed.test": ("A", "198.18.1.10"),
    "denied.test": ("A", "198.18.2.10"),
    "cdn.test": ("A", "198.18.3.10"),
    "img.cdn.test": ("A", "198.18.3.10"),
    "lo.rebind.test": ("A", "127.0.0.1"),
    "private.rebind.test": ("A", "10.0.0.5"),
}

# Long enough that no answer a test's guest received expires while the
# test runs (the egress allowlist binds addresses to names for a TTL).
TTL = 600

# The web and TCP servers log from many threads.
LOG_LOCK = threading.Lock()


def log_line(path, line):
    with LOG_LOCK, open(path, "a") as log:
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
            records.append(encode_name(current) + struct.pack("!HHIH", 5, 1, TTL, len(rdata)) + rdata)
            current = value
            continue
        if qtype == 1:
            rdata = socket.inet_aton(value)
            records.append(encode_name(current) + struct.pack("!HHIH", 1, 1, TTL, 4) + rdata)
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


def web_handler(address, root, log, scheme):
    class Handler(http.server.SimpleHTTPRequestHandler):
        # Keep-alive, so a test can send a second request on a connection:
        # every answer has a Content-Length.
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if scheme == "http":
                seen = self.headers.get("Host", "-")
            else:
                seen = getattr(self.connection, "sni", None) or "-"
            log_line(log, f"{scheme} {seen} {self.command} {self.path}")
            if os.path.isfile(self.translate_path(self.path)):
                return super().do_GET()
            body = f"hello from {address}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return functools.partial(Handler, directory=root)


def serve_web(directory, root, cert, key, addresses):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def remember_sni(sock, name, _context):
        # The handshake's SNI, for the log (None: the client sent none).
        sock.sni = name

    context.sni_callback = remember_sni

    class Tls(http.server.ThreadingHTTPServer):
        def finish_request(self, request, client_address):
            # In the request's thread: a slow or broken ClientHello holds
            # only its own connection.
            request.settimeout(30)
            tls = context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            try:
                tls.do_handshake()
            except (OSError, ssl.SSLError) as e:
                sni = getattr(tls, "sni", None) or "-"
                log_line(self.log, f"tls-failed {sni} {type(e).__name__}")
                tls.close()
                return
            log_line(self.log, f"tls {getattr(tls, 'sni', None) or '-'}")
            self.RequestHandlerClass(tls, client_address, self)

    http.server.ThreadingHTTPServer.allow_reuse_address = True
    servers = []
    for address in addresses:
        log = os.path.join(directory, f"web-{address}.log")
        plain = http.server.ThreadingHTTPServer((address, 80), web_handler(address, root, log, "http"))
        tls = Tls((address, 443), web_handler(address, root, log, "https"))
        tls.log = log
        servers += [plain, tls]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    for address in addresses:
        log_line(os.path.join(directory, f"web-{address}.log"), "ready")
    threading.Event().wait()


def serve_tcp(log, endpoints):
    def serve(listener, name):
        while True:
            conn, _peer = listener.accept()
            log_line(log, f"connect {name}")
            try:
                conn.sendall(f"hello from {name}\n".encode())
            except OSError:
                pass
            conn.close()

    for endpoint in endpoints:
        address, port = endpoint.rsplit(":", 1)
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((address, int(port)))
        listener.listen(64)
        threading.Thread(target=serve, args=(listener, endpoint), daemon=True).start()
    log_line(log, "ready")
    threading.Event().wait()


if __name__ == "__main__":
    if sys.argv[1] == "dns":
        serve_dns(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "echo":
        echo(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "watch":
        watch(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "web":
        serve_web(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
    elif sys.argv[1] == "tcp":
        serve_tcp(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(__doc__)
