"""The comparator policy itself, on synthetic outputs: it must hide nothing
but what it is told to, and skip only with both versions named."""

import pytest

from harness import QemuVersion, Result
from qemu_compat import (
    BASELINE_ONLY, EXACT, PORTABLE, SEMVER, VERSION_SPECIFIC, Tolerance, assert_qemu_compatible,
)

V10 = QemuVersion.parse("qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)")
V1003 = QemuVersion(10, 0, 3)
V72 = QemuVersion(7, 2, 22)
OUT = b"image: a.vmdk\nfile format: vmdk\ndisk size: 16 KiB\n    cid: 3405087638\n"


def r(out=OUT, rc=0, err=b""):
    return Result(out, err, rc)


def test_exact_equal_passes():
    assert_qemu_compatible(r(), r(), EXACT, category=PORTABLE, actual_version=V10, baseline_version=V10)


@pytest.mark.parametrize("category", [PORTABLE, BASELINE_ONLY, VERSION_SPECIFIC])
def test_one_character_fails(category):
    with pytest.raises(pytest.fail.Exception, match="stdout differs"):
        assert_qemu_compatible(r(OUT.replace(b"vmdk\n", b"vmdK\n")), r(), EXACT,
                               category=category, actual_version=V10, baseline_version=V10)


def test_exit_code_and_stderr_fail():
    with pytest.raises(pytest.fail.Exception, match="exit code"):
        assert_qemu_compatible(r(rc=1), r(), EXACT, category=PORTABLE, actual_version=V10, baseline_version=V10)
    with pytest.raises(pytest.fail.Exception, match="stderr first line"):
        assert_qemu_compatible(r(err=b"instar: x\n"), r(err=b"qemu-img: y\n"), EXACT,
                               category=PORTABLE, actual_version=V10, baseline_version=V10)


def test_program_name_prefix_is_not_a_difference():
    assert_qemu_compatible(r(err=b"instar: Could not open 'x'\n"), r(err=b"qemu-img: Could not open 'x'\n"),
                           EXACT, category=PORTABLE, actual_version=V10, baseline_version=V10)


def test_field_subset_masks_only_its_fields():
    tol = Tolerance("field-subset", ("cid", "disk-size"))
    other = OUT.replace(b"3405087638", b"12").replace(b"16 KiB", b"20 KiB")
    assert_qemu_compatible(r(other), r(), tol, category=BASELINE_ONLY, actual_version=V10, baseline_version=V10)
    with pytest.raises(pytest.fail.Exception):
        assert_qemu_compatible(r(other.replace(b"vmdk\n", b"qcow2\n")), r(), tol,
                               category=BASELINE_ONLY, actual_version=V10, baseline_version=V10)


def test_version_specific_skips_naming_both_versions():
    with pytest.raises(pytest.skip.Exception, match=r"skipped because qemu-img 7\.2\.22 != baseline qemu-img 10\.0\.2"):
        assert_qemu_compatible(r(b"x"), r(), SEMVER, category=VERSION_SPECIFIC, actual_version=V72, baseline_version=V10)


def test_semver_compatible_holds_same_minor_exactly():
    assert_qemu_compatible(r(), r(), SEMVER, category=VERSION_SPECIFIC, actual_version=V1003, baseline_version=V10)
    with pytest.raises(pytest.fail.Exception):
        assert_qemu_compatible(r(b"x"), r(), SEMVER, category=VERSION_SPECIFIC, actual_version=V1003, baseline_version=V10)


@pytest.mark.parametrize("category", [PORTABLE, BASELINE_ONLY])
def test_other_versions_never_relax_portable_or_baseline_only(category):
    with pytest.raises(pytest.fail.Exception):
        assert_qemu_compatible(r(b"x"), r(), EXACT, category=category, actual_version=V72, baseline_version=V10)


def test_skip_tolerance_logs_reason():
    with pytest.raises(pytest.skip.Exception, match="volatile"):
        assert_qemu_compatible(r(b"x"), r(), Tolerance("skip", reason="volatile"), category=BASELINE_ONLY,
                               actual_version=V10, baseline_version=V10)


def test_version_parsing():
    assert V10.short == "10.0.2" and V10.pkg.startswith("Debian")
    assert QemuVersion.parse("qemu-img version 9.2.90\nCopyright") == QemuVersion(9, 2, 90)


def test_report_of_non_utf8_output_is_valid_utf8():
    # reports cross process boundaries (xdist): no lone surrogates allowed
    with pytest.raises(pytest.fail.Exception) as e:
        assert_qemu_compatible(r(b"name: \xff\x01\n"), r(b"name: \xfe\x01\n"), EXACT,
                               category=PORTABLE, actual_version=V10, baseline_version=V10)
    str(e.value).encode("utf-8")
    assert "\\xff" in str(e.value)


def test_module_hint_is_not_the_first_line():
    hint = b"qemu-img: module block-block-dmg-bz2 not found, do you want to install qemu-block-extra package?\n"
    assert_qemu_compatible(r(), r(err=hint), EXACT, category=PORTABLE, actual_version=V10, baseline_version=V10)
    with pytest.raises(pytest.fail.Exception):
        assert_qemu_compatible(r(), r(err=hint + b"qemu-img: real error\n"), EXACT,
                               category=PORTABLE, actual_version=V10, baseline_version=V10)
