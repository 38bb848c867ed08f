"""Configuration: one YAML file + a few env variables + CLI flags → one frozen :class:`Settings`.

This is the only module that reads YAML or environment variables. The operator's file is
deep-merged over the embedded default (``gateway/default_config.yaml``), so a file that only sets
``upstream.address_overrides`` keeps the default allowlist. Lists replace, mappings merge.

Precedence, lowest to highest: embedded default → ``--config`` file → env (``TRIVY_GATEWAY_*``)
→ CLI flags. Secrets (proxy password, upstream credentials, parent proxy password) are only ever
read from env variables or files named in the config, never from the YAML itself.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from ._parse import ByteSize, ConfigError, Duration, from_mapping, parse_duration, parse_size
from .cache import (CacheSettings, GitHubSettings, MavenSettings, MemoryFrontSettings, OCISettings,
                    S3Settings, SharedSettings)
from .logging import LoggingSettings
from .mirror import MirrorOCISettings, MirrorSettings, MirrorTLSSettings
from .policy import PolicySettings, RuleSettings
from .proxy import ProxyAuthSettings, ProxySettings
from .server import ServerSettings, split_hostport
from .tls import TLSSettings
from .upstream import (CircuitSettings, CredentialSettings, HostLimitSettings, ParentProxySettings,
                       RetrySettings, UpstreamSettings)

__all__ = [
    "Settings", "load_settings", "ConfigError", "Duration", "ByteSize", "parse_duration",
    "parse_size", "ServerSettings", "ProxySettings", "ProxyAuthSettings", "TLSSettings",
    "PolicySettings", "RuleSettings", "UpstreamSettings", "RetrySettings", "HostLimitSettings",
    "CircuitSettings", "CredentialSettings", "ParentProxySettings", "CacheSettings",
    "MemoryFrontSettings", "OCISettings", "MavenSettings", "GitHubSettings", "LoggingSettings",
    "split_hostport", "default_config_text", "MirrorSettings", "MirrorOCISettings",
    "MirrorTLSSettings", "SharedSettings", "S3Settings",
]

ENV_PREFIX = "TRIVY_GATEWAY_"
#: env variable → (section, key); the essentials a container sets without YAML
ENV_OVERRIDES = {
    "TRIVY_GATEWAY_LISTEN": ("server", "listen"),
    "TRIVY_GATEWAY_ADMIN_LISTEN": ("server", "admin_listen"),
    "TRIVY_GATEWAY_MIRROR_LISTEN": ("server", "mirror_listen"),
    "TRIVY_GATEWAY_DATA_DIR": ("server", "data_dir"),
    "TRIVY_GATEWAY_LOG_LEVEL": ("logging", "level"),
    "TRIVY_GATEWAY_LOG_FORMAT": ("logging", "format"),
    "TRIVY_GATEWAY_CACHE_MAX_SIZE": ("cache", "max_size"),
}


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = ServerSettings()
    proxy: ProxySettings = ProxySettings()
    tls: TLSSettings = TLSSettings()
    policy: PolicySettings = PolicySettings()
    upstream: UpstreamSettings = UpstreamSettings()
    cache: CacheSettings = CacheSettings()
    logging: LoggingSettings = LoggingSettings()
    mirror: MirrorSettings = MirrorSettings()
    #: where the operator's file came from ("<embedded default>" when none)
    source: str = "<embedded default>"

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)

    def validate(self, path: str) -> None:
        """Cross-section checks: the mirror door only names upstreams the cache understands.

        Checked only when the door is on: the embedded ``mirror`` routes must not turn an
        operator's own ``cache.oci.public_repositories`` list (lists replace) into an error
        about a door they never opened."""
        if self.server.worker_count > 1 and not self.cache.shared.redis_url:
            raise ConfigError("server.workers", "more than one worker needs "
                              "cache.shared.redis_url: the workers share single flight, circuits "
                              "and budget through Redis (docs/scale-out.md)")
        if not self.server.mirror_listen:
            return
        if not self.cache.enabled:
            raise ConfigError("server.mirror_listen", "the mirror door needs cache.enabled: it "
                              "serves what the cache fetches with the gateway's own credentials")
        oci = self.cache.oci
        for name, target in self.mirror.oci.short_names.items():
            if target not in oci.public_repositories:
                raise ConfigError(f"mirror.oci.short_names.{name}",
                                  f"{target} must also be listed in cache.oci.public_repositories")
        for name, repo in self.mirror.maven.items():
            if repo.strip("/") not in {r.strip("/") for r in self.cache.maven.repositories}:
                raise ConfigError(f"mirror.maven.{name}",
                                  f"{repo} must also be listed in cache.maven.repositories")


def default_config_text() -> str:
    return resources.files("gateway").joinpath("default_config.yaml").read_text("utf-8")


def _deep_merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _read_yaml(text: str, source: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError("", f"not valid YAML: {where}{getattr(exc, 'problem', exc)}", source) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"the top level must be a mapping, got {type(data).__name__}", source)
    return data


def _read_secret(env_name: Optional[str], file_name: Optional[str], env: Mapping[str, str],
                 path: str) -> str:
    if file_name:
        try:
            return Path(file_name).read_text("utf-8").strip()
        except OSError as exc:
            raise ConfigError(path, f"cannot read secret file {file_name}: {exc.strerror}") from None
    if env_name:
        return env.get(env_name, "")
    return ""


def _resolve_secrets(settings: Settings, env: Mapping[str, str]) -> Settings:
    auth = settings.proxy.auth
    if auth.enabled:
        password = _read_secret(auth.password_env, auth.password_file, env, "proxy.auth")
        if not password:
            raise ConfigError("proxy.auth", f"proxy auth is enabled but {auth.password_env} is "
                              "empty and no password_file is set", settings.source)
        settings = dataclasses.replace(settings, proxy=dataclasses.replace(
            settings.proxy, auth=dataclasses.replace(auth, password=password)))
    tls = settings.tls
    if tls.ca_key_password_file or tls.ca_key_password_env:
        secret = _read_secret(tls.ca_key_password_env, tls.ca_key_password_file, env, "tls")
        if not secret:
            raise ConfigError("tls.ca_key_password_env", f"{tls.ca_key_password_env} is empty "
                              "and no ca_key_password_file is set", settings.source)
        settings = dataclasses.replace(settings, tls=dataclasses.replace(
            tls, ca_key_password=secret))
    creds = []
    for i, cred in enumerate(settings.upstream.credentials):
        secret = _read_secret(cred.secret_env, cred.secret_file, env, f"upstream.credentials[{i}]")
        creds.append(dataclasses.replace(cred, secret=secret))
    shared = settings.cache.shared
    if shared.redis_password_env:
        secret = env.get(shared.redis_password_env, "")
        if not secret:
            raise ConfigError("cache.shared.redis_password_env",
                              f"{shared.redis_password_env} is empty", settings.source)
        settings = dataclasses.replace(settings, cache=dataclasses.replace(
            settings.cache, shared=dataclasses.replace(shared, redis_password=secret)))
    parent = settings.upstream.parent_proxy
    if parent.password_env:
        parent = dataclasses.replace(parent, password=env.get(parent.password_env, ""))
    return dataclasses.replace(settings, upstream=dataclasses.replace(
        settings.upstream, credentials=tuple(creds), parent_proxy=parent))


def load_settings(config_path: Optional[str] = None, *, env: Optional[Mapping[str, str]] = None,
                  overrides: Optional[Mapping[str, Mapping[str, Any]]] = None) -> Settings:
    """Load and validate the whole configuration; raise :class:`ConfigError` naming key and file.

    ``overrides`` are CLI flags as ``{"server": {"listen": "..."}}``; they win over everything.
    """
    env = os.environ if env is None else env
    data = _read_yaml(default_config_text(), "<embedded default>")
    source = "<embedded default>"
    config_path = config_path or env.get("TRIVY_GATEWAY_CONFIG") or None
    if config_path:
        try:
            text = Path(config_path).read_text("utf-8")
        except OSError as exc:
            raise ConfigError("", f"cannot read config file: {exc.strerror}", config_path) from None
        data = _deep_merge(data, _read_yaml(text, config_path))
        source = config_path
    env_layer: dict[str, dict[str, Any]] = {}
    for name, (section, key) in ENV_OVERRIDES.items():
        if env.get(name):
            env_layer.setdefault(section, {})[key] = env[name]
    data = _deep_merge(data, env_layer)
    if overrides:
        data = _deep_merge(data, {k: dict(v) for k, v in overrides.items() if v})
    data.pop("source", None)
    try:
        settings = from_mapping(Settings, data)
    except ConfigError as exc:
        raise ConfigError(exc.path, exc.message, source) from None
    settings = dataclasses.replace(settings, source=source)
    return _resolve_secrets(settings, env)
