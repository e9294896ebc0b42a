"""Who may do what on the embedded nats-server: one NATS user per service role, with only the
subjects that role needs, and a fresh password for each on every start. An anonymous client is
refused: without a role's password nobody reads prompts off the bus or joins a queue group.

Only the merger may publish a request's Meet and StartHead (its control subject); the gateway
may only Cancel (its cancel subject). Each role receives replies on inboxes of its own
(`_INBOX_<role>.>`), so no role reads the replies sent to another.
"""

from __future__ import annotations

import secrets
from typing import Any

from shared.wire import subjects

ROLES: dict[str, dict[str, list[str]]] = {
    "gateway": {
        "publish": [
            subjects.GENERATE, subjects.COMPUTE_INFO, subjects.MERGER_INFO, subjects.LOADER_INFO,
            subjects.CANCEL_ALL,
        ],
        "subscribe": [  # (telemetry: the stores' problems)
            subjects.STREAM_ALL, subjects.DISCOVERY, subjects.TELEMETRY_ALL,
        ],
    },
    "merger": {
        "publish": [
            subjects.COMPUTE_INFO, subjects.COMPUTE_PREFILL, subjects.PREFILL_ALL,
            subjects.LOOKUP, subjects.LOOKUP_ALL, subjects.FETCH_ALL,
            subjects.CONTROL_ALL,  # Meet, StartHead
            subjects.CANCEL_ALL, subjects.STREAM_ALL,  # Cancel; Failed
        ],
        "subscribe": [
            subjects.GENERATE, subjects.MERGER_INFO, subjects.EVENTS_ALL, subjects.TELEMETRY_ALL,
            subjects.CANCEL_ALL,  # a client's Cancel, to relay
            subjects.DISCOVERY,
        ],
    },
    "compute": {
        "publish": [
            subjects.STREAM_ALL, subjects.EVENTS_ALL, subjects.LOOKUP_ALL,
            subjects.STORE_ALL, subjects.TELEMETRY_EACH,  # (lookups, stores: its write-backs)
        ],
        "subscribe": [
            subjects.COMPUTE_INFO, subjects.COMPUTE_PREFILL, subjects.PREFILL_ALL,
            subjects.CONTROL_ALL, subjects.CANCEL_ALL, subjects.EVENTS_ALL, subjects.DISCOVERY,
        ],
    },
    "loader": {
        "publish": [subjects.EVENTS_ALL, subjects.TELEMETRY_EACH],
        "subscribe": [
            subjects.LOOKUP, subjects.LOOKUP_ALL, subjects.LOADER_INFO, subjects.FETCH_ALL,
            subjects.STORE_ALL, subjects.CONTROL_ALL, subjects.CANCEL_ALL,
            subjects.EVENTS_ALL, subjects.DISCOVERY,  # (HeadComputing, ChunkComputed)
        ],
    },
    "observer": {  # benchmark timelines, dashboards, `nats micro ls`
        "publish": [subjects.DISCOVERY],
        "subscribe": [subjects.EVENTS_ALL, subjects.TELEMETRY_ALL],
    },
}  # fmt: skip


def new_passwords() -> dict[str, str]:
    """A fresh random password for every role."""
    return {role: secrets.token_urlsafe(24) for role in ROLES}


def authorization(passwords: dict[str, str]) -> dict[str, Any]:
    """The nats-server `authorization` block: each role's user, password and permissions
    (replies to requests it serves allowed)."""
    users = []
    for role, allowed in ROLES.items():
        permissions = {
            # a role that publishes nothing gets a subject nobody uses: nats-server takes an
            # empty allow list as no restriction
            "publish": {"allow": allowed["publish"] or ["_cake.nothing"]},
            "subscribe": {"allow": [*allowed["subscribe"], f"{subjects.inbox_prefix(role)}.>"]},
            "allow_responses": True,
        }
        users.append({"user": role, "password": passwords[role], "permissions": permissions})
    return {"users": users}


def with_credentials(url: str, role: str, password: str) -> str:
    """The server URLs (comma-separated) with a role's credentials in each (what that service
    connects with)."""
    with_them = []
    for one in url.split(","):
        scheme, _, rest = one.partition("://")
        with_them.append(f"{scheme}://{role}:{password}@{rest}")
    return ",".join(with_them)
