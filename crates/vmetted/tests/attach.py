"""A client of vmetted's WebSocket attach written with `websockets` (and
httpx for the REST calls) only, as a browser terminal or an agent would:
it drives a shell on a PTY (typing, a resize that `stty size` reports, the
exit status from the status channel), reads a plain exec's stdout and
stderr on their own channels, writes and closes stdin, floods the stdin of
a command that never reads it and still gets its output, and checks that a
second attach, a missing subprotocol, an oversized message, a text
message and an unknown channel are refused while the session stays
usable. Given a TCP address and token, it attaches there too, with the
token as a subprotocol as a browser must. Prints "attach client: ok".

    python3 attach.py SOCKET [HOST:PORT TOKEN]
"""

import asyncio
import json
import sys

import httpx
from websockets.asyncio.client import connect, unix_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

PROTOCOL = "v1.attach.vmette.dev"
STDIN, STDOUT, STDERR, STATUS, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


class Attached:
    """One attach: what arrived on each channel so far."""

    def __init__(self, ws):
        self.ws = ws
        self.out = {STDOUT: b"", STDERR: b""}
        self.statuses = []

    async def send(self, channel, payload=b""):
        await self.ws.send(bytes([channel]) + payload)

    async def type(self, text):
        await self.send(STDIN, text.encode())

    async def resize(self, rows, cols):
        await self.send(RESIZE, json.dumps({"rows": rows, "cols": cols}).encode())

    async def read_one(self):
        message = await asyncio.wait_for(self.ws.recv(), 60)
        assert isinstance(message, bytes), f"a text message: {message!r}"
        channel, payload = message[0], message[1:]
        if channel == STATUS:
            self.statuses.append(json.loads(payload))
        else:
            assert channel in (STDOUT, STDERR), f"channel {channel}"
            self.out[channel] += payload

    async def until_output(self, needle):
        while needle.encode() not in self.out[STDOUT]:
            await self.read_one()

    async def until_status(self, kind):
        while not any(s["type"] == kind for s in self.statuses):
            await self.read_one()
        return next(s for s in self.statuses if s["type"] == kind)

    async def until_closed(self):
        try:
            while True:
                await self.read_one()
        except ConnectionClosed:
            pass
        return self.ws.close_code


def attach(socket, session, exec_id, **kwargs):
    return unix_connect(
        socket,
        f"ws://vmette/v1/sessions/{session}/execs/{exec_id}/attach",
        subprotocols=kwargs.pop("subprotocols", [PROTOCOL]),
        **kwargs,
    )


async def main(socket, tcp=None, token=None):
    transport = httpx.HTTPTransport(uds=socket)
    client = httpx.Client(transport=transport, base_url="http://vmette", timeout=120)
    created = client.post("/v1/sessions", json={"name": "ws"})
    assert created.status_code == 201, created.text
    session = created.json()["id"]

    def exec_(**body):
        started = client.post(f"/v1/sessions/{session}/execs", json=body)
        assert started.status_code == 201, started.text
        return started.json()["id"]

    # A shell on a PTY: typed arithmetic, a resize, and the exit status.
    shell = exec_(argv=["sh", "-i"], tty=True, rows=24, cols=80)
    async with attach(socket, session, shell) as ws:
        assert ws.subprotocol == PROTOCOL, ws.subprotocol
        a = Attached(ws)
        await a.type("echo $((6*7))\n")
        await a.until_output("42\r\n")
        # A second client would split the output: refused.
        try:
            async with attach(socket, session, shell):
                raise AssertionError("a second attach was let in")
        except InvalidStatus as refused:
            assert refused.response.status_code == 409, refused.response.status_code
        await a.resize(33, 101)
        await a.type("stty size\n")
        await a.until_output("33 101")
        await a.type("exit 3\n")
        status = await a.until_status("exit")
        assert status["exit_code"] == 3 and status["reason"] == "exited", status
        assert await a.until_closed() == 1000

    # A plain exec: stdout and stderr on their own channels; a resize is
    # refused on the status channel and the attach goes on.
    plain = exec_(argv=["sh", "-c", "read _; echo out; echo err >&2; exit 5"], stdin=True)
    async with attach(socket, session, plain) as ws:
        a = Attached(ws)
        await a.resize(10, 10)
        refused = await a.until_status("error")
        assert "terminal" in refused["message"], refused
        await a.type("go\n")
        status = await a.until_status("exit")
        assert status["exit_code"] == 5, status
        assert a.out[STDOUT] == b"out\n", a.out
        assert a.out[STDERR] == b"err\n", a.out

    # Stdin, then its end: cat echoes it and exits.
    cat = exec_(argv=["cat"], stdin=True)
    async with attach(socket, session, cat) as ws:
        a = Attached(ws)
        await a.type("hello\n")
        await a.send(CLOSE, bytes([STDIN]))
        status = await a.until_status("exit")
        assert status["exit_code"] == 0, status
        assert a.out[STDOUT] == b"hello\n", a.out

    # The client's own close is answered.
    ticker = exec_(argv=["sh", "-c", "while :; do echo tick; sleep 0.1; done"], stdin=True)
    async with attach(socket, session, ticker) as ws:
        await Attached(ws).until_output("tick")
        await ws.close()
        assert ws.close_code == 1000, ws.close_code

    # A command that never reads its stdin, flooded with it: its output
    # still flows. (The client's further messages wait unread, a close
    # too, so this client hangs up.)
    async with attach(socket, session, ticker) as ws:
        a = Attached(ws)

        async def flood():
            for _ in range(64):
                await a.type("x" * 65536)

        flooding = asyncio.create_task(flood())
        await asyncio.sleep(1)
        assert not flooding.done(), "4 MiB of stdin went into a command that reads none"
        a.out[STDOUT] = b""
        await a.until_output("tick\ntick\ntick\n")
        flooding.cancel()
        ws.transport.abort()
    # The exec is free for the next client as soon as the daemon has seen
    # the hang-up.
    for _ in range(50):
        try:
            async with attach(socket, session, ticker) as ws:
                await Attached(ws).until_output("tick")
                break
        except InvalidStatus as refused:
            assert refused.response.status_code == 409, refused.response.status_code
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the exec stayed attached after its client left")
    signalled = client.post(f"/v1/sessions/{session}/execs/{ticker}/signal", json={"signal": 9})
    assert signalled.status_code == 204, signalled.text

    # No subprotocol: refused before the upgrade.
    sleeper = exec_(argv=["sleep", "600"], stdin=True)
    try:
        async with attach(socket, session, sleeper, subprotocols=None):
            raise AssertionError("an attach without the subprotocol was let in")
    except InvalidStatus as refused:
        assert refused.response.status_code == 400, refused.response.status_code

    # An oversized message, a text message and an unknown channel each
    # close the connection with their own code.
    async with attach(socket, session, sleeper, max_size=None) as ws:
        await ws.send(bytes([STDIN]) + b"x" * 70000)
        assert await Attached(ws).until_closed() == 1009, ws.close_code
    async with attach(socket, session, sleeper) as ws:
        await ws.send("text")
        assert await Attached(ws).until_closed() == 1003, ws.close_code
    async with attach(socket, session, sleeper) as ws:
        await ws.send(bytes([9, 1, 2]))
        assert await Attached(ws).until_closed() == 1008, ws.close_code

    # The session is as usable as before.
    echo = exec_(argv=["echo", "still here"])
    async with attach(socket, session, echo) as ws:
        a = Attached(ws)
        await a.until_status("exit")
        assert a.out[STDOUT] == b"still here\n", a.out

    if tcp is not None:
        url = f"ws://{tcp}/v1/sessions/{session}/execs/{echo}/attach"
        # Wrong token, and a page of another origin: refused.
        for protocols, origin, code in [
            ([PROTOCOL, "bearer.vmette.dev.wrong"], None, 401),
            ([PROTOCOL, "bearer.vmette.dev." + token], "http://evil.example", 403),
        ]:
            try:
                async with connect(url, subprotocols=protocols, origin=origin):
                    raise AssertionError("let in over TCP")
            except InvalidStatus as refused:
                assert refused.response.status_code == code, refused.response.status_code
        # The token as a subprotocol, as a browser sends it; the daemon
        # answers with the attach protocol only.
        again = exec_(argv=["echo", "over tcp"])
        url = f"ws://{tcp}/v1/sessions/{session}/execs/{again}/attach"
        async with connect(url, subprotocols=[PROTOCOL, "bearer.vmette.dev." + token]) as ws:
            assert ws.subprotocol == PROTOCOL, ws.subprotocol
            a = Attached(ws)
            await a.until_status("exit")
            assert a.out[STDOUT] == b"over tcp\n", a.out

    deleted = client.delete(f"/v1/sessions/{session}")
    assert deleted.status_code == 200, deleted.text
    print("attach client: ok")


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
