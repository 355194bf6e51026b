"""The enclaveq command line and its demo; the system itself lives in the sibling packages
(attestation, broker_adapters, enclave_worker, producer_sdk, protocol)."""
