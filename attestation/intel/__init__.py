"""Intel SGX / TDX DCAP, shared by :mod:`attestation.sgx` and :mod:`attestation.tdx`.

``abi`` parses quotes, ``verify`` checks their signatures and PCK chain, ``pck`` reads the PCK
certificate's SGX Extensions, ``collateral`` parses and verifies TCB Info / QE Identity and
evaluates TCB status, ``tcb_status`` holds the status vocabulary, ``policy`` reads the parts of
the ``[sgx]`` / ``[tdx]`` tables both platforms share, and ``fetch`` is the optional PCS fetcher.
"""
