"""Schemathesis hooks for the daemon's fuzz test (tests/openapi.rs).

A fuzzed session never gets host paths or an image. The description allows
them, and so would schemathesis: a session whose rootfs is the host's `/`,
writable, followed by a fuzzed `DELETE …/files?path=/x&recursive=true` on
it, would delete the test machine's files; a fuzzed image name would be
pulled from Docker Hub, and the tests contact nothing off loopback; a
fuzzed network would publish ports on any host address and let a fuzzed
command reach outward. So every request that creates a session loses its
`shares`, `disks`, `rootfs`, `image` and `network` before it is sent,
whatever phase made it. A case meant to be
refused gets an invalid value in their place instead, so that removing
them cannot make it valid.
"""

import json

import schemathesis

HOST_PATHS = ("shares", "disks", "rootfs", "image", "network")
# What stands for a host path in a case meant to be refused: still invalid
# (each field wants an array or an object), so the case stays negative.
REFUSED = 0


def _without_host_paths(body, negative):
    if isinstance(body, dict):
        if negative:
            return {k: (REFUSED if k in HOST_PATHS else v) for k, v in body.items()}
        return {k: v for k, v in body.items() if k not in HOST_PATHS}
    if isinstance(body, (str, bytes)):
        # The daemon reads the body as JSON whatever its content type.
        try:
            parsed = json.loads(body)
        except ValueError:
            return body
        if isinstance(parsed, dict) and any(k in parsed for k in HOST_PATHS):
            return json.dumps(_without_host_paths(parsed, negative))
    return body


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.method.upper() == "POST" and case.path == "/v1/sessions":
        meta = getattr(case, "meta", None)
        negative = bool(meta is not None and meta.generation.mode.is_negative)
        case.body = _without_host_paths(case.body, negative)


@schemathesis.serializer("application/x-tar")
def tar_bytes(ctx, value):
    # The body is `format: binary`: sent as the bytes it is, as for
    # application/octet-stream.
    return {"data": value if isinstance(value, bytes) else str(value).encode()}
