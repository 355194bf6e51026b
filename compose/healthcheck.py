"""The enclaveq image's HEALTHCHECK: healthy once the worker is ready, i.e. admitted to its pool.

compose.yaml starts workers with ``--health-port 9101 --metrics-addr 0.0.0.0``; the worker's
``GET /ready`` answers 200 once it has joined its pool with a key and consumes jobs, and 503
before that and while it drains after SIGTERM (``GET /live`` would say only that it runs). The
URL can be changed with ``ENCLAVEQ_HEALTH_URL``. Standard library only; exit 0 healthy, 1 not.
"""

import os
import sys
import urllib.error
import urllib.request

URL = os.environ.get("ENCLAVEQ_HEALTH_URL", "http://127.0.0.1:9101/ready")

try:
    with urllib.request.urlopen(URL, timeout=4) as response:
        status, body = response.status, response.read(64)
except urllib.error.HTTPError as exc:  # 503: not (or no longer) ready
    print(f"unhealthy: {URL}: {exc.code} {exc.read(64).decode('ascii', 'replace').strip()}")
    sys.exit(1)
except OSError as exc:
    print(f"unhealthy: {URL}: {exc}")
    sys.exit(1)
print(f"healthy: {URL}: {status} {body.decode('ascii', 'replace').strip()}")
sys.exit(0 if status == 200 else 1)
