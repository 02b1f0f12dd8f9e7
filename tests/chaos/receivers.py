"""The chaos runs' receivers: nexusgen.receiver.WebhookReceiver told to be well-behaved, flaky, slow,
trickling, gone (410), redirecting, or down.

Each keeps every request with the status the sender got (None when the sender gave up first), so a run
counts deliveries repeated after a 2xx from the receivers' side (`repeated_after_2xx`).
"""

from __future__ import annotations

from nexusgen.receiver import Behaviour, WebhookReceiver

MODES = {
    "ok": Behaviour(statuses=[200]),
    "flaky": Behaviour(statuses=[500, 200], per_event=True),  # each event fails once, then succeeds
    "slow": Behaviour(statuses=[200], delay_s=4.0),  # longer than the chaos stack's 2 s attempt deadline
    "trickle": Behaviour(statuses=[200], trickle_s=0.5),
    "gone": Behaviour(statuses=[410]),
    "redirect": Behaviour(statuses=[302], headers={"Location": "http://127.0.0.1:9/elsewhere"}),
    "down": Behaviour(),
}


def chaos_receiver(mode: str) -> WebhookReceiver:
    """A receiver on a free loopback port answering as `mode` says; a `down` one has closed its port."""
    receiver = WebhookReceiver(None, MODES[mode], path=f"/{mode}")
    if mode == "down":
        receiver.close()  # nothing listens on the port any more
    return receiver
