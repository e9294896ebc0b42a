"""Every NATS subject Cake uses. No subject string is written anywhere else.

Per-request subjects carry the request id; a compute or loader replica subscribes to a
request's control and events subjects while it holds the request, so it receives only the
messages of requests it serves.
"""

from __future__ import annotations

from shared.core.names import checked_token

ROOT = "cake"

# request/reply, queue groups
GENERATE = f"{ROOT}.merger.generate"  # gateway -> merger: GenerateRequest -> Accepted
COMPUTE_INFO = f"{ROOT}.compute.info"  # any -> compute: (empty) -> ModelInfo
COMPUTE_PREFILL = f"{ROOT}.compute.prefill"  # merger -> compute: PrefillJob -> Accepted
LOOKUP = f"{ROOT}.loader.lookup"  # merger -> loader: LookupRequest -> LookupReply
MERGER_INFO = f"{ROOT}.merger.info"  # any -> merger: (empty) -> Accepted (it is up)
LOADER_INFO = f"{ROOT}.loader.info"  # any -> loader: (empty) -> Accepted(node) (it is up)

# fire and forget
CONTROL_ALL = f"{ROOT}.req.*.control"  # (permissions: any request's)
CANCEL_ALL = f"{ROOT}.req.*.cancel"
EVENTS_ALL = f"{ROOT}.req.*.events"  # every request's chunk events (benchmark timelines)
TELEMETRY_ALL = f"{ROOT}.telemetry.>"  # every node's telemetry (mergers, operators)

# wildcards of the per-node and per-request subjects below (the server's permissions)
STREAM_ALL = f"{ROOT}.req.*.stream"  # a request's Tokens, Done and Failed
FETCH_ALL = f"{ROOT}.loader.*.fetch"
LOOKUP_ALL = f"{ROOT}.loader.*.lookup"  # a lookup routed to one node's loader
PREFILL_ALL = f"{ROOT}.compute.*.prefill"  # a job routed to one node's compute
STORE_ALL = f"{ROOT}.loader.*.store"
TELEMETRY_EACH = f"{ROOT}.telemetry.*.*"  # a service's telemetry on its node
DISCOVERY = "$SRV.>"  # nats.micro's PING, INFO and STATS: every service answers, observers ask

QUEUE_MERGER = "merger"
QUEUE_COMPUTE = "compute"
QUEUE_LOADER = "loader"


def lookup(node: str) -> str:
    """merger -> the loader of node `node`: LookupRequest -> LookupReply (what it can fetch)."""
    return f"{ROOT}.loader.{checked_token(node, 'node')}.lookup"


def prefill(node: str) -> str:
    """merger -> the compute replica of node `node`: PrefillJob -> Accepted (routed there)."""
    return f"{ROOT}.compute.{checked_token(node, 'node')}.prefill"


def fetch(node: str) -> str:
    """merger -> the loader beside compute node `node`: FetchJob."""
    return f"{ROOT}.loader.{checked_token(node, 'node')}.fetch"


def store(node: str) -> str:
    """compute -> the loader on its node: StoreJob (write staged chunks back to storage)."""
    return f"{ROOT}.loader.{checked_token(node, 'node')}.store"


def telemetry(service: str, node: str) -> str:
    """compute/loader -> anyone: that service's Telemetry on `node`, every CAKE_TELEMETRY_S."""
    return f"{ROOT}.telemetry.{checked_token(service, 'service')}.{checked_token(node, 'node')}"


def events(request_id: str) -> str:
    """compute/loader -> merger: ChunkComputed, ChunkLoaded, LoadFailed of one request;
    compute -> loader: HeadComputing, ChunkComputed."""
    return f"{ROOT}.req.{checked_token(request_id, 'request id')}.events"


def control(request_id: str) -> str:
    """merger -> compute and loader: Meet, StartHead of one request (the merger's word only)."""
    return f"{ROOT}.req.{checked_token(request_id, 'request id')}.control"


def cancel(request_id: str) -> str:
    """gateway/merger -> merger, compute and loader: Cancel of one request."""
    return f"{ROOT}.req.{checked_token(request_id, 'request id')}.cancel"


def stream(request_id: str) -> str:
    """compute/merger -> gateway: Tokens, Done or Failed of one request."""
    return f"{ROOT}.req.{checked_token(request_id, 'request id')}.stream"


def inbox_prefix(user: str | None) -> str:
    """Where replies to a NATS user's requests go (each role its own; no user: NATS's)."""
    return f"_INBOX_{checked_token(user, 'user')}" if user else "_INBOX"


def request_id_of(subject: str) -> str:
    """The request id inside a per-request subject."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != ROOT or parts[1] != "req":
        raise ValueError(f"{subject!r} is not a per-request subject")
    return parts[2]
