"""Test helpers that build whole evidence chains in memory (fake signers), for this project's
tests and for anyone testing code that consumes attestation. Never used by production paths.
"""
