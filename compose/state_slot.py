"""Run a command with a state directory of its own: the first free slot under a state root.

    python3 state_slot.py ROOT enclaveq worker ARGS...   # runs: enclaveq worker ARGS... --state-dir ROOT/slot-N/state

compose.yaml starts every worker replica through this. With Docker Compose each replica has its
own anonymous volume at ROOT and always takes slot 0; where replicas share one volume (podman-compose
names a service's anonymous volume once for all its replicas), each takes a different slot. A
slot is held by an exclusive lock on ROOT/slot-N/.lock for the life of the command (the lock's
descriptor survives the exec), so two live workers never share sealed state, and a restarted
container takes its slot -- and its sealed pool key and models -- back.
"""

import fcntl
import os
import sys
from pathlib import Path

MAX_SLOTS = 256


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    root, command = Path(sys.argv[1]), sys.argv[2:]
    for n in range(MAX_SLOTS):
        slot = root / f"slot-{n}"
        slot.mkdir(parents=True, exist_ok=True)
        fd = os.open(slot / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.set_inheritable(fd, True)
        print(f"state_slot: using {slot / 'state'}", file=sys.stderr, flush=True)
        os.execvp(command[0], [*command, "--state-dir", str(slot / "state")])
    sys.exit(f"state_slot: all {MAX_SLOTS} slots under {root} are in use")


if __name__ == "__main__":
    main()
