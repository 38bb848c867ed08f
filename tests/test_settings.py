"""Configuration: embedded default, merge, env/flag precedence, and errors naming key and file."""
import pytest

from gateway.settings import ConfigError, default_config_text, load_settings


def test_embedded_default_matches_config_dir():
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    assert (repo / "config" / "gateway.yaml").read_text() == default_config_text()


def test_default_policy_intercepts_trivy_hosts_only_on_443():
    s = load_settings(env={})
    rules = {r.host: r for r in s.policy.rules}
    for host in ("mirror.gcr.io", "googlecode.l.googleusercontent.com", "ghcr.io",
                 "pkg-containers.githubusercontent.com", "api.github.com", "codeload.github.com",
                 "repo.maven.apache.org", "github.com", "raw.githubusercontent.com"):
        assert rules[host].action == "intercept" and rules[host].ports == (443,)
    assert rules["check.trivy.dev"].action == "deny"


def test_file_merges_over_default_and_flags_win(tmp_path):
    f = tmp_path / "gw.yaml"
    f.write_text("server: {listen: '127.0.0.1:1'}\nupstream: {address_overrides: {ghcr.io: '127.0.0.1:9'}}\n")
    s = load_settings(str(f), env={"TRIVY_GATEWAY_LISTEN": "127.0.0.1:2"},
                      overrides={"server": {"data_dir": "/tmp/x"}})
    assert s.server.listen == "127.0.0.1:2"  # env over file
    assert s.server.data_dir == "/tmp/x"  # flag
    assert s.upstream.address_overrides["ghcr.io"] == "127.0.0.1:9"
    assert len(s.policy.rules) == 10  # default policy kept


@pytest.mark.parametrize("text, key", [
    ("cache: {max_size: lots}", "cache.max_size"),
    ("cache: {maxsize: 1}", "cache.maxsize"),
    ("policy: {rules: [{host: a.b, action: allow}]}", "policy.rules[0].action"),
    ("server: {listen: nonsense}", "server.listen"),
    ("upstream: {retry: {attempts: 'x'}}", "upstream.retry.attempts"),
    ("proxy: {max_connections: -1}", "proxy.max_connections"),
    ("proxy: {max_connections_per_client: -1}", "proxy.max_connections_per_client"),
    ("proxy: {auth: {max_failures: -1}}", "proxy.auth.max_failures"),
    ("proxy: {auth: {lockout: 0}}", "proxy.auth.lockout"),
    ("upstream: {parent_proxy: {no_proxy: ['http://x']}}", "upstream.parent_proxy.no_proxy[0]"),
])
def test_bad_config_names_key_and_file(tmp_path, text, key):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(str(f), env={})
    assert key in str(exc.value) and str(f) in str(exc.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("server: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(str(f), env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(str(tmp_path / "absent.yaml"), env={})


def test_proxy_password_comes_from_env_and_is_not_in_repr(tmp_path):
    f = tmp_path / "auth.yaml"
    f.write_text("proxy: {auth: {enabled: true, username: scanner}}")
    with pytest.raises(ConfigError, match="TRIVY_GATEWAY_PROXY_PASSWORD"):
        load_settings(str(f), env={})
    s = load_settings(str(f), env={"TRIVY_GATEWAY_PROXY_PASSWORD": "s3cret"})
    assert s.proxy.auth.password == "s3cret"
    assert "s3cret" not in repr(s)


def test_cli_check_config_exit_codes(tmp_path, capsys):
    from gateway.cli import main

    assert main(["check-config"]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("logging: {level: loud}")
    assert main(["check-config", "--config", str(bad)]) == 2
    assert "logging.level" in capsys.readouterr().err
