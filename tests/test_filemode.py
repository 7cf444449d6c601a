"""Go os.FileMode bits versus Unix st_mode (protocol-notes 4.2)."""

import stat

import pytest

from reference import filemode as fm

# (st_mode, Go FileMode as fsutil's sender puts it on the wire)
MODE_TABLE = [
    (stat.S_IFREG | 0o644, 0o644),
    (stat.S_IFREG | 0o755, 0o755),
    (stat.S_IFDIR | 0o755, 0x80000000 | 0o755),
    (stat.S_IFLNK | 0o777, 0x08000000 | 0o777),
    (stat.S_IFIFO | 0o644, 0x02000000 | 0o644),
    (stat.S_IFCHR | 0o666, 0x04000000 | 0x00200000 | 0o666),
    (stat.S_IFBLK | 0o660, 0x04000000 | 0o660),
    (stat.S_IFSOCK | 0o755, 0o755),  # the sender clears the socket bit
    (stat.S_IFREG | stat.S_ISUID | 0o755, 0x00800000 | 0o755),
    (stat.S_IFREG | stat.S_ISGID | 0o755, 0x00400000 | 0o755),
    (stat.S_IFDIR | stat.S_ISVTX | 0o777, 0x80000000 | 0x00100000 | 0o777),
    (stat.S_IFDIR | stat.S_ISGID | 0o2775 & 0o777, 0x80000000 | 0x00400000 | 0o775),
]


@pytest.mark.parametrize("st_mode,go_mode", MODE_TABLE)
def test_sender_mode_table(st_mode, go_mode):
    assert fm.sender_mode(st_mode) == go_mode


@pytest.mark.parametrize("st_mode,go_mode", [row for row in MODE_TABLE if not stat.S_ISSOCK(row[0])])
def test_round_trip(st_mode, go_mode):
    assert fm.st_mode_from_go_mode(go_mode) == st_mode


def test_socket_keeps_bit_before_clearing():
    assert fm.go_mode_from_st_mode(stat.S_IFSOCK | 0o755) == 0x01000000 | 0o755


def test_unix_directory_mode_is_not_a_go_directory():
    # The classic bug: 0o040755 sent raw has no Go type bit, i.e. looks like a file.
    assert not fm.is_dir(stat.S_IFDIR | 0o755)
    assert fm.is_regular(stat.S_IFDIR | 0o755)


def test_mode_type_constant():
    assert fm.MODE_TYPE == 0x8F280000


@pytest.mark.parametrize("major,minor", [(1, 3), (8, 0), (259, 65536), (4095, 1048575), (0, 0)])
def test_device_numbers_round_trip(major, minor):
    assert fm.dev_numbers(fm.rdev_from_numbers(major, minor)) == (major, minor)


def test_device_numbers_match_os_makedev_for_small_numbers():
    import os

    assert fm.dev_numbers(os.makedev(1, 3)) == (1, 3)
    assert fm.dev_numbers(os.makedev(259, 70000)) == (259, 70000)
