"""Configuration: embedded default, merge, env/flag precedence, and errors naming key and file."""
import json

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
    # the mirror door: every mirrored upstream must be one the cache knows
    ("server: {mirror_listen: 'nope'}", "server.mirror_listen"),
    ("{server: {mirror_listen: ':5000'}, cache: {enabled: false}}", "server.mirror_listen"),
    ("mirror: {tls: {cert: /x.pem}}", "mirror.tls"),
    ("{server: {mirror_listen: ':5000'}, mirror: {oci: {short_names: {db: other.io/x/db}}}}",
     "mirror.oci.short_names.db"),
    ("mirror: {oci: {short_names: {Bad_Name: mirror.gcr.io/aquasec/trivy-db}}}",
     "mirror.oci.short_names.Bad_Name"),
    ("{server: {mirror_listen: ':5000'}, mirror: {maven: {central: repo1.example.org/maven2}}}",
     "mirror.maven.central"),
    ("mirror: {maven: {v2: repo.maven.apache.org/maven2}}", "mirror.maven.v2"),
    ("mirror: {vex: {hub: 'http://x/vex-repository.json'}}", "mirror.vex.hub"),
    ("cache: {max_object_share: 1.5}", "cache.max_object_share"),
    ("cache: {github: {archive_ttl: soon}}", "cache.github.archive_ttl"),
    ("cache: {github: {archive_ttl: -5}}", "cache.github.archive_ttl"),
    ("cache: {max_object_share: 0}", "cache.max_object_share"),
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


def test_mirror_routes_are_not_checked_while_the_door_is_off():
    """An operator who lists their own public repositories (lists replace) and never opens the
    mirror door must not get an error about the door's embedded short names."""
    s = load_settings(env={}, overrides={"cache": {"oci": {"public_repositories": [
        "ghcr.io/aquasecurity/trivy-db"]}}})
    assert not s.server.mirror_listen


def test_every_error_in_a_file_is_reported_at_once_with_lines(tmp_path):
    f = tmp_path / "many.yaml"
    f.write_text("server:\n  listen: nonsense\n"
                 "cache:\n  maxsize: 3\n"
                 "logging:\n  level: loud\n"
                 "policy:\n  rules:\n    - {host: a.b, action: allow}\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(str(f), env={})
    found = {(e.path, e.line) for e in exc.value.errors}
    assert found == {("server.listen", 2), ("cache.maxsize", 4), ("logging.level", 6),
                     ("policy.rules[0].action", 9)}
    text = str(exc.value)
    assert text.startswith("4 problems") and f"{f} line 6" in text


def test_yaml_syntax_error_keeps_pyyaml_context_and_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text('server:\n  listen: "127.0.0.1:1\n')
    with pytest.raises(ConfigError) as exc:
        load_settings(str(f), env={})
    assert "while scanning a quoted scalar started at line 2" in str(exc.value)
    assert exc.value.line == 3


@pytest.mark.parametrize("text, key, hint", [
    ("tls: {ca_key_password: hunter2}", "tls.ca_key_password", "ca_key_password_file"),
    ("proxy: {auth: {password: hunter2}}", "proxy.auth.password", "password_env"),
    ("upstream: {credentials: [{host: ghcr.io, type: bearer, secret: hunter2}]}",
     "upstream.credentials[0].secret", "secret_env"),
    ("upstream: {parent_proxy: {password: hunter2}}", "upstream.parent_proxy.password",
     "password_env"),
])
def test_secrets_are_rejected_in_yaml(tmp_path, text, key, hint):
    f = tmp_path / "secret.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(str(f), env={})
    assert key in str(exc.value) and "never read from the YAML" in str(exc.value)
    assert hint in str(exc.value) and "hunter2" not in str(exc.value)


def test_internal_fields_are_not_keys_and_nonsense_values_have_floors(tmp_path):
    f = tmp_path / "odd.yaml"
    f.write_text("source: /etc/other.yaml\ncache: {max_size: 10}\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(str(f), env={})
    messages = {e.path: e.message for e in exc.value.errors}
    assert "unknown key" in messages["source"]
    f.write_text("cache: {max_size: 10}\n")
    with pytest.raises(ConfigError, match=r"cache.max_size in .* line 1: must be at least 1MiB"):
        load_settings(str(f), env={})


def test_errors_name_the_flag_or_env_that_set_the_value(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_settings(None, env={}, overrides={"server": {"listen": "41007"}})
    assert str(exc.value).startswith("server.listen in flag --listen:")
    with pytest.raises(ConfigError) as exc:
        load_settings(None, env={"TRIVY_GATEWAY_ADMIN_LISTEN": "x"})
    assert str(exc.value).startswith("server.admin_listen in env TRIVY_GATEWAY_ADMIN_LISTEN:")
    f = tmp_path / "gw.yaml"
    f.write_text("server:\n  data_dir: /srv/gw\n")
    s = load_settings(str(f), env={})
    assert s.origin("server.data_dir") == f"{f} line 2"
    s = load_settings(str(f), env={"TRIVY_GATEWAY_DATA_DIR": "/d"})
    assert s.origin("server.data_dir") == "env TRIVY_GATEWAY_DATA_DIR"


def test_check_config_print_never_shows_a_secret(tmp_path, capsys):
    from gateway.cli import main

    key = tmp_path / "pw"
    key.write_text("hunter2\n")
    f = tmp_path / "gw.yaml"
    f.write_text(f"proxy: {{auth: {{enabled: true, username: u, password_file: '{key}'}}}}\n")
    assert main(["check-config", "--print", "--config", str(f)]) == 0
    out = capsys.readouterr().out
    assert "hunter2" not in out and '"password_file"' in out
    assert "source" not in json.loads(out)      # the loader's internal field is not a setting


def test_env_overriding_a_file_value_is_recorded_for_a_warning(tmp_path):
    f = tmp_path / "gw.yaml"
    f.write_text("server:\n  data_dir: /srv/gw\n  listen: 127.0.0.1:1\n")
    s = load_settings(str(f), env={"TRIVY_GATEWAY_DATA_DIR": "/data",
                                   "TRIVY_GATEWAY_LISTEN": "127.0.0.1:1"})
    assert s.overridden == (f"server.data_dir: env TRIVY_GATEWAY_DATA_DIR='/data' overrides "
                            f"'/srv/gw' of {f} line 2",)   # same value: nothing to say
