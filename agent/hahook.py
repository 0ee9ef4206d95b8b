"""keepalived's side of an HA pair: the health check and the notify hook (standard library only: keepalived
runs the check every second, so it must start fast).

    python3 -m agent.hahook check http://127.0.0.1:8080     exit 0 only when this box may hold the address
    python3 -m agent.hahook notify /run/pacsgw/ha-role MASTER   record keepalived's new state for the agent
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request

STATES = ("MASTER", "BACKUP", "FAULT", "STOP")


def eligible(health: dict) -> tuple[bool, str]:
    """May the box behind this /healthz answer hold the floating address? → (yes, why not)."""
    if health.get("status") != "ok":
        return False, f"status {health.get('status')}: {'; '.join(health.get('reasons', []))}"
    ha = health.get("ha")
    if not isinstance(ha, dict):
        return False, "the agent runs without [ha] enabled"
    if not ha.get("eligible"):
        return False, str(ha.get("reason", "not eligible"))
    return True, ""


def check(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=timeout) as r:
            health = json.load(r)
    except urllib.error.HTTPError as e:  # 503: failing
        health = json.load(e)
    except (OSError, ValueError) as e:
        print(f"pacsgw ha check: agent unreachable: {e}", file=sys.stderr)
        return 1
    ok, why = eligible(health)
    if not ok:
        print(f"pacsgw ha check: {why}", file=sys.stderr)
    return 0 if ok else 1


def notify(role_file: str, state: str) -> int:
    """Write keepalived's state atomically; the agent polls the file (it may start after keepalived)."""
    state = state.upper()
    if state not in STATES:
        print(f"pacsgw ha notify: state {state!r} is not one of {', '.join(STATES)}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(role_file) or ".", exist_ok=True)
    tmp = f"{role_file}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"state": state, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, role_file)
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "check":
        return check(argv[1])
    if len(argv) == 3 and argv[0] == "notify":
        return notify(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
