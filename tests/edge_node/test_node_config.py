"""Node TOML config: the example file is valid, and every bad key or value is refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import ConfigError
from edge_node.config import NodeConfig, load_node_config, node_config_from_dict

EXAMPLE = Path(__file__).resolve().parents[2] / "edge_node" / "node.example.toml"


def test_example_file_loads_with_documented_values():
    config = load_node_config(EXAMPLE)
    assert config.node_id == "cam-north-1"
    assert config.index.type == "flat" and config.limits.max_k == 100
    assert config.adapter_dir == Path("/var/lib/fedretrieve/adapters")
    assert isinstance(config.adapter_poll_s, float)
    text = EXAMPLE.read_text()
    sections = (config, config.index, config.camera_norm, config.auth, config.limits)
    for section in sections:  # every field documented
        for name in section.__dataclass_fields__:
            if name not in ("index", "camera_norm", "auth", "limits"):
                assert f"\n{name.replace('_', '-')} = " in text, name


def test_relative_paths_resolve_against_the_file(tmp_path: Path):
    (tmp_path / "token").write_text("s3cret\n")
    path = tmp_path / "node.toml"
    path.write_text(
        'node-id = "n1"\ndata-dir = "d"\nadapter-dir = ""\n[auth]\ntoken-file = "token"\n'
    )
    config = load_node_config(path)
    assert config.data_dir == tmp_path / "d" and config.adapter_dir is None
    assert config.auth.resolved_token() == "s3cret"


BAD = {
    "unknown top-level key": ({"node-idd": "x"}, "unknown key(s) node-idd"),
    "unknown section key": ({"index": {"tpye": "flat"}}, "unknown key(s) tpye"),
    "bad index type": ({"index": {"type": "lsh"}}, "[index] type"),
    "zero max-k": ({"limits": {"max-k": 0}}, "[limits] max-k"),
    "string for int": ({"limits": {"max-k": "10"}}, "max-k"),
    "bad listen": ({"listen": "50051"}, "listen"),
    "bad node id": ({"node-id": "a b"}, "node-id"),
    "unknown backend": ({"backend": "tpu"}, "backend"),
    "text-tower not bool": ({"text-tower": "no"}, "text-tower"),
    "cert without key": ({"auth": {"tls-cert": "cert.pem"}}, "tls-cert"),
    "missing token file": ({"auth": {"token-file": "nope"}}, "token-file"),
    "negative grace": ({"grace-s": -1}, "grace-s"),
    "camera-norm enabled not bool": ({"camera-norm": {"enabled": 1}}, "camera-norm.enabled"),
    "zero min-images": ({"camera-norm": {"min-images": 0}}, "[camera-norm] min-images"),
    "refit-change of 1": ({"camera-norm": {"refit-change": 1.0}}, "[camera-norm] refit-change"),
    "unknown camera-norm key": ({"camera-norm": {"min-image": 5}}, "unknown key(s) min-image"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_refused_naming_the_key(tmp_path: Path, case: str):
    (tmp_path / "cert.pem").write_text("x")
    override, message = BAD[case]
    table = {"node-id": "n1", "data-dir": "d", **override}
    with pytest.raises(ConfigError) as err:
        node_config_from_dict(table, tmp_path)
    assert message in str(err.value)


def test_required_keys_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="node-id"):
        node_config_from_dict({"data-dir": "d"})
    with pytest.raises(ConfigError, match="not found"):
        load_node_config(tmp_path / "absent.toml")
    assert NodeConfig(node_id="n", data_dir=str(tmp_path)).data_dir == tmp_path
