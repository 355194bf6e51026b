"""The enclaveq image's HEALTHCHECK: healthy while the worker serves its Prometheus metrics.

compose.yaml starts workers with ``--metrics-port 9100 --metrics-addr 0.0.0.0``; the URL can be
changed with ``ENCLAVEQ_HEALTH_URL``. Standard library only, exit 0 healthy, 1 not.
"""

import os
import sys
import urllib.request

URL = os.environ.get("ENCLAVEQ_HEALTH_URL", "http://127.0.0.1:9100/metrics")

try:
    with urllib.request.urlopen(URL, timeout=4) as response:
        body = response.read()
except OSError as exc:
    print(f"unhealthy: {URL}: {exc}")
    sys.exit(1)
sys.exit(0 if b"enclaveq_worker_requests_total" in body else 1)
