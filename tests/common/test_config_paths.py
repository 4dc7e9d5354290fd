"""common.config's path helpers: one meaning of "" (not set) and of relative paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.config import kebab, resolve_path, resolve_paths
from common.errors import ConfigError


def test_empty_means_not_set_never_the_working_directory(tmp_path: Path):
    assert resolve_path("", tmp_path, "adapter-dir") is None


def test_relative_absolute_home_and_dotdot(tmp_path: Path):
    assert resolve_path("d/x.pem", tmp_path, "k") == str(tmp_path / "d" / "x.pem")
    assert resolve_path("/etc/x.pem", tmp_path, "k") == "/etc/x.pem"
    assert resolve_path("~/x", tmp_path, "k") == os.path.expanduser("~/x")
    assert resolve_path("a/../b", tmp_path, "k") == str(tmp_path / "b")
    assert Path(resolve_path("x", "rel", "k")).is_absolute()


def test_symlinks_are_not_followed(tmp_path: Path):
    (tmp_path / "v7").mkdir()
    (tmp_path / "latest").symlink_to(tmp_path / "v7")
    assert resolve_path("latest", tmp_path, "adapter") == str(tmp_path / "latest")


def test_non_strings_are_refused_by_name(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"auth\.tls-cert: must be a path string, got 3"):
        resolve_paths({"tls_cert": 3}, ("tls_cert",), tmp_path, "auth")


def test_resolve_paths_drops_empty_keys_and_leaves_others(tmp_path: Path):
    table = {"cert": "c.pem", "key": "", "other": "x"}
    resolve_paths(table, ("cert", "key", "ca"), tmp_path, "tls")
    assert table == {"cert": str(tmp_path / "c.pem"), "other": "x"}


def test_kebab():
    assert kebab("max_query_chars") == "max-query-chars"
