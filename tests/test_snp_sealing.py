"""SEV-SNP sealing: the firmware's derived key (MSG_KEY_REQ via SNP_GET_DERIVED_KEY on /dev/sev-guest).

The device is a fake (attestation/providers/fakes.py FakeSevGuest) that checks every byte the
worker sends against the ABI of include/uapi/linux/sev-guest.h and the SEV-SNP firmware ABI,
and derives a deterministic key from a fake chip secret and the selected launch fields. One
test runs the real ioctl path (ctypes) against a plain file, which the kernel refuses.
"""

from __future__ import annotations

import errno
import logging
import struct

import pytest

from attestation.providers import ProviderFailed, ProviderUnavailable
from attestation.providers.fakes import FakeSevGuest, FakeTsmKernel, fake_snp_report
from attestation.providers.ioctl import decode_exitinfo2, encode_guest_request_ioctl, iowr
from attestation.providers.snp_derived_key import (FIELD_FAMILY_ID, FIELD_GUEST_POLICY, FIELD_IMAGE_ID,
                                                   FIELD_MEASUREMENT, FIELD_TCB_VERSION, SEALING_FIELDS,
                                                   SNP_GET_DERIVED_KEY, DerivedKeyRequest,
                                                   parse_derived_key_response, snp_derived_key)
from enclave_worker.errors import SealedStateError
from enclave_worker.platform import EPHEMERAL_SEALING_WARNING, platform_sealing_key, tee_identity
from enclave_worker.sealed_state import PoolKeys, SealedState

MEASUREMENT = bytes.fromhex("5e" * 48)


def device(tmp_path, **guest) -> tuple[FakeTsmKernel, FakeSevGuest]:
    sev = FakeSevGuest(measurement=guest.pop("measurement", MEASUREMENT), **guest)
    return FakeTsmKernel(tmp_path, provider="sev_guest", sev_guest=sev), sev


# -- the bytes on the wire ---------------------------------------------------------------------
def test_the_ioctl_number_and_structs_are_laid_out_as_the_kernel_abi_says():
    # _IOWR('S', 0x1, struct snp_guest_request_ioctl): dir 3 << 30 | size 32 << 16 | 'S' << 8 | 1
    assert SNP_GET_DERIVED_KEY == 0xC0205301 == iowr("S", 1, 32)
    # snp_guest_request_ioctl: u8 msg_version, 7 bytes padding, u64 req_data, u64 resp_data, u64 exitinfo2
    assert encode_guest_request_ioctl(1, 0x1122334455667788, 0x99AABBCCDDEEFF00, 0) == (
        b"\x01" + bytes(7) + bytes.fromhex("8877665544332211") + bytes.fromhex("00ffeeddccbbaa99") + bytes(8))
    # snp_derived_key_req: u32 root_key_select, u32 rsvd, u64 guest_field_select, u32 vmpl, u32 guest_svn, u64 tcb
    assert DerivedKeyRequest(field_select=0b001111, vmpl=2, guest_svn=5, tcb_version=0x0102030405060708).encode() == (
        bytes.fromhex("00000000" "00000000" "0f00000000000000" "02000000" "05000000" "0807060504030201"))
    assert SEALING_FIELDS == FIELD_MEASUREMENT | FIELD_GUEST_POLICY | FIELD_FAMILY_ID | FIELD_IMAGE_ID == 0b1111


def test_the_worker_sends_exactly_the_sealing_request(tmp_path):
    kernel, sev = device(tmp_path)
    key = snp_derived_key(DerivedKeyRequest(vmpl=0), root=tmp_path, ops=kernel)
    assert sev.requests == [bytes(4) + bytes(4) + struct.pack("<Q", 0b1111) + bytes(4) + bytes(4) + bytes(8)]
    assert len(key) == 32 and key == sev.key(0, SEALING_FIELDS, 0, 0, 0)


def test_the_key_is_the_32_bytes_after_the_msg_key_rsp_header():
    response = struct.pack("<I", 0) + b"\xaa" * 28 + bytes(range(32))
    assert parse_derived_key_response(response) == bytes(range(32))
    with pytest.raises(ProviderFailed, match=r"status 0x16 \(invalid parameters\)"):
        parse_derived_key_response(struct.pack("<I", 0x16) + bytes(60))
    with pytest.raises(ProviderFailed, match="all-zero"):
        parse_derived_key_response(bytes(64))
    with pytest.raises(ProviderFailed, match="64"):
        parse_derived_key_response(bytes(32))


def test_requests_outside_the_abi_are_refused_before_they_leave():
    for bad in (dict(field_select=1 << 6), dict(vmpl=4), dict(root_key_select=2), dict(guest_svn=-1)):
        with pytest.raises(ValueError):
            DerivedKeyRequest(**bad)


# -- what the key depends on -------------------------------------------------------------------
def test_the_key_is_stable_and_bound_to_the_selected_launch_fields(tmp_path):
    kernel, _ = device(tmp_path / "a")
    first = snp_derived_key(root=kernel.root, ops=kernel)
    assert snp_derived_key(root=kernel.root, ops=kernel) == first                       # stable across calls
    assert snp_derived_key(DerivedKeyRequest(field_select=FIELD_MEASUREMENT), root=kernel.root, ops=kernel) != first
    assert snp_derived_key(DerivedKeyRequest(vmpl=1), root=kernel.root, ops=kernel) != first
    other, _ = device(tmp_path / "b", measurement=bytes.fromhex("66" * 48))           # another launch image
    assert snp_derived_key(root=other.root, ops=other) != first
    debug, _ = device(tmp_path / "c", policy=(1 << 17) | (1 << 16) | (1 << 19))      # same image, debug policy
    assert snp_derived_key(root=debug.root, ops=debug) != first
    # ...while a field that is not selected does not matter:
    unselected = DerivedKeyRequest(field_select=FIELD_GUEST_POLICY)
    assert snp_derived_key(unselected, root=other.root, ops=other) == snp_derived_key(unselected, root=kernel.root,
                                                                                        ops=kernel)


def test_a_tcb_newer_than_committed_is_an_invalid_parameter(tmp_path):
    kernel, _ = device(tmp_path, committed_tcb=5)
    with pytest.raises(ProviderFailed, match="status 0x16"):
        snp_derived_key(DerivedKeyRequest(field_select=FIELD_TCB_VERSION, tcb_version=6), root=tmp_path, ops=kernel)


def test_a_vmpl_below_the_guests_is_refused_by_the_firmware(tmp_path):
    kernel, sev = device(tmp_path, current_vmpl=2)
    with pytest.raises(ProviderFailed, match="status 0x16"):
        snp_derived_key(DerivedKeyRequest(vmpl=0), root=tmp_path, ops=kernel)
    assert snp_derived_key(DerivedKeyRequest(vmpl=2), root=tmp_path, ops=kernel) == sev.key(0, SEALING_FIELDS, 2, 0, 0)


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("code, exitinfo2, expected", [
    (errno.EIO, 0xFFFFFFFFFFFFFFFF, r"EIO.*did not reach the firmware"),
    (errno.EIO, 0x16, r"EIO.*firmware error 0x16 INVALID_PARAM"),
    (errno.EAGAIN, 2 << 32, r"EAGAIN.*host \(VMM\) error 2 SNP_GUEST_VMM_ERR_BUSY"),
    (errno.EINVAL, 0xFF, r"EINVAL.*did not reach the firmware"),
])
def test_kernel_and_firmware_errors_are_provider_failures_that_say_why(tmp_path, code, exitinfo2, expected):
    kernel, _ = device(tmp_path, errors=[(code, exitinfo2)])
    with pytest.raises(ProviderFailed, match=expected):
        snp_derived_key(root=tmp_path, ops=kernel)


def test_exitinfo2_decoding():
    assert decode_exitinfo2(0) == decode_exitinfo2(0xFF) == "the request did not reach the firmware"
    assert decode_exitinfo2((1 << 32) | 0x7) == "host (VMM) error 1 SNP_GUEST_VMM_ERR_INVALID_LEN, firmware error 0x7"


def test_no_device_is_unavailable_and_a_non_device_refuses_the_ioctl(tmp_path):
    # The real code path: os.open + ioctl(2) through ctypes, on a tree without the device...
    with pytest.raises(ProviderUnavailable, match="dev/sev-guest not found.*ENOENT"):
        snp_derived_key(root=tmp_path)
    # ...and on a plain file, which the kernel answers with ENOTTY.
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "sev-guest").write_bytes(b"")
    with pytest.raises(ProviderFailed, match="does not understand SNP_GET_DERIVED_KEY.*ENOTTY"):
        snp_derived_key(root=tmp_path)


def test_enodev_on_open_is_unavailable(tmp_path):
    class NoDevice(FakeTsmKernel):
        def guest_request(self, path, request, msg_version, req, resp_size):
            raise OSError(errno.ENODEV, "No such device", str(path))

    kernel = NoDevice(tmp_path, provider="sev_guest")
    with pytest.raises(ProviderUnavailable, match="ENODEV.*modprobe sev-guest"):
        snp_derived_key(root=tmp_path, ops=kernel)


# -- the worker --------------------------------------------------------------------------------
def snp_tree(tmp_path, measurement=MEASUREMENT, **guest) -> tuple[FakeTsmKernel, FakeSevGuest]:
    return device(tmp_path, measurement=measurement, **guest)


def sealed_state(identity, root):
    return SealedState(root, "pool", identity.sealing_key, identity.seal, identity.unseal)


def test_an_snp_worker_reopens_its_sealed_state_after_a_restart(tmp_path):
    kernel, sev = snp_tree(tmp_path / "tee")
    first = tee_identity("snp", root=kernel.root, ops=kernel)
    assert first.persistent_sealing and len(sev.requests) == 1
    keys = PoolKeys(epoch=1, pool_private_key=b"\x01" * 32, identity_private_key=b"\x02" * 32)
    sealed_state(first, tmp_path / "state").save_pool_keys(keys)
    restarted = tee_identity("snp", root=kernel.root, ops=kernel)
    assert sealed_state(restarted, tmp_path / "state").load_pool_keys() == keys


def test_another_launch_image_cannot_unseal_it(tmp_path):
    mine, _ = snp_tree(tmp_path / "a")
    sealed_state(tee_identity("snp", root=mine.root, ops=mine), tmp_path / "state").save_pool_keys(
        PoolKeys(1, b"\x01" * 32, b"\x02" * 32))
    other, _ = snp_tree(tmp_path / "b", measurement=bytes.fromhex("66" * 48))
    with pytest.raises(SealedStateError, match="does not unseal"):
        sealed_state(tee_identity("snp", root=other.root, ops=other), tmp_path / "state").load_pool_keys()


def test_the_sealing_key_is_bound_to_the_measured_configuration(tmp_path):
    kernel, _ = snp_tree(tmp_path)

    class Snp:
        platform = "snp"

    one = platform_sealing_key(Snp(), b"\x01" * 32, root=tmp_path, ops=kernel)
    assert one is not None and one != platform_sealing_key(Snp(), b"\x02" * 32, root=tmp_path, ops=kernel)


def test_the_key_is_requested_at_the_vmpl_of_the_guests_reports(tmp_path):
    kernel, sev = snp_tree(tmp_path, current_vmpl=2)

    class Snp:
        platform = "snp"

    assert platform_sealing_key(Snp(), b"\x01" * 32, root=tmp_path, ops=kernel, snp_vmpl=2) is not None
    assert struct.unpack_from("<I", sev.requests[-1], 16)[0] == 2


@pytest.mark.parametrize("failure", [(errno.EIO, 0x16), (errno.ENODEV, 0)], ids=["firmware-error", "enodev"])
def test_without_the_firmware_key_the_worker_seals_ephemerally_and_warns(tmp_path, caplog, failure):
    kernel, _ = snp_tree(tmp_path, errors=[failure])
    caplog.set_level(logging.WARNING, logger="enclaveq.worker")
    identity = tee_identity("snp", root=kernel.root, ops=kernel)
    assert identity.persistent_sealing is False
    assert "no SEV-SNP sealing key from the firmware" in caplog.text and EPHEMERAL_SEALING_WARNING in caplog.text


def test_a_guest_without_sev_guest_device_seals_ephemerally(tmp_path, caplog):
    def report_new(_provider, inblob, vmpl):
        return fake_snp_report(inblob.ljust(64, b"\0"), vmpl=vmpl), b""

    kernel = FakeTsmKernel(tmp_path, provider="sev_guest", report_new=report_new)
    caplog.set_level(logging.WARNING, logger="enclaveq.worker")
    identity = tee_identity("snp", root=kernel.root, ops=kernel)
    assert identity.persistent_sealing is False and "dev/sev-guest not found" in caplog.text
