"""A client of vmetted's API written with httpx and httpx-sse only, as a
Python agent framework would: it creates a session, streams an exec's
separate stdout and stderr (base64), sends stdin and closes it, reconnects
with Last-Event-ID mid-stream and misses nothing, moves a file both ways,
and deletes the session. Prints "python client: ok" when all held.

    python3 client.py SOCKET
"""

import base64
import sys

import httpx
from httpx_sse import connect_sse


def events(client, url, last_id=None, limit=None):
    """The exec's events as (id, kind, data), at most `limit` of them."""
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    got = []
    with connect_sse(client, "GET", url, headers=headers) as source:
        for sse in source.iter_sse():
            got.append((int(sse.id), sse.event, sse.json()))
            if limit is not None and len(got) >= limit:
                break
            if sse.event in ("exit", "failed"):
                break
    return got


def output(got, kind):
    return b"".join(base64.b64decode(d["data"]) for _, k, d in got if k == kind)


def main(socket):
    transport = httpx.HTTPTransport(uds=socket)
    with httpx.Client(transport=transport, base_url="http://vmette", timeout=120) as client:
        created = client.post("/v1/sessions", json={"name": "py"})
        assert created.status_code == 201, created.text
        session = created.json()["id"]

        # Separate streams, decoded from base64; stdin in and closed.
        r = client.post(
            f"/v1/sessions/{session}/execs",
            json={"argv": ["sh", "-c", "echo to-out; echo to-err >&2; cat"], "stdin": True},
        )
        assert r.status_code == 201, r.text
        url = f"/v1/sessions/{session}/execs/{r.json()['id']}"
        assert client.post(f"{url}/stdin", content=b"fed\x00bytes\n").status_code == 204
        assert client.post(f"{url}/stdin/close").status_code == 204
        got = events(client, f"{url}/events")
        assert output(got, "stdout") == b"to-out\nfed\x00bytes\n", got
        assert output(got, "stderr") == b"to-err\n", got
        assert got[-1][1] == "exit" and got[-1][2]["exit_code"] == 0, got

        # Away mid-stream and back with Last-Event-ID: nothing missed.
        r = client.post(
            f"/v1/sessions/{session}/execs",
            json={"argv": ["sh", "-c", "for i in 1 2 3 4 5 6; do echo line-$i; sleep 0.3; done"]},
        )
        url = f"/v1/sessions/{session}/execs/{r.json()['id']}"
        first = events(client, f"{url}/events", limit=2)
        rest = events(client, f"{url}/events", last_id=first[-1][0])
        ids = [i for i, _, _ in first + rest]
        assert ids == sorted(set(ids)), ids
        assert not any(k == "gap" for _, k, _ in rest), rest
        text = output(first + rest, "stdout").decode()
        assert text == "".join(f"line-{i}\n" for i in range(1, 7)), text

        # A file up and down.
        blob = bytes(range(256)) * 4096
        r = client.put(
            f"/v1/sessions/{session}/files", params={"path": "/tmp/py.bin", "mode": "600"}, content=blob
        )
        assert r.status_code == 201 and r.json()["bytes"] == len(blob), r.text
        r = client.get(f"/v1/sessions/{session}/files", params={"path": "/tmp/py.bin"})
        assert r.status_code == 200 and r.content == blob
        missing = client.get(f"/v1/sessions/{session}/files", params={"path": "/tmp/none"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"

        r = client.delete(f"/v1/sessions/{session}")
        assert r.status_code == 200, r.text
        assert client.get(f"/v1/sessions/{session}").status_code == 404
    print("python client: ok")


if __name__ == "__main__":
    main(sys.argv[1])
