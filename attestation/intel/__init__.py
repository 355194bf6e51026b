"""Intel SGX / TDX DCAP: quote parsing (abi), PCK certificate extensions (pck), TCB Info / QE Identity
collateral and TCB status evaluation (collateral), optional PCS fetcher (fetch)."""
