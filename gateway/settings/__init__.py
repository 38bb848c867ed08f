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
import hashlib
import json
import os
import types
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from ._parse import (INTERNAL, ByteSize, ConfigError, ConfigErrors, Duration, from_mapping,
                     parse_duration, parse_size)
from .cache import (CacheSettings, GitHubSettings, MavenSettings, MemoryFrontSettings, OCISettings,
                    S3Settings, SharedSettings)
from .lifecycle import (LifecycleSettings, PrefetchArtifactSettings, PrefetchSettings,
                        PrefetchSource)
from .logging import LoggingSettings
from .mirror import MirrorOCISettings, MirrorSettings, MirrorTLSSettings
from .policy import PolicySettings, RuleSettings
from .proxy import ProxyAuthSettings, ProxySettings
from .server import ServerSettings, split_hostport
from .tls import TLSSettings
from .upstream import (CircuitSettings, CredentialSettings, HostLimitSettings, ParentProxySettings,
                       RetrySettings, UpstreamSettings)

__all__ = [
    "Settings", "load_settings", "ConfigError", "ConfigErrors", "Duration", "ByteSize", "parse_duration",
    "parse_size", "ServerSettings", "ProxySettings", "ProxyAuthSettings", "TLSSettings",
    "PolicySettings", "RuleSettings", "UpstreamSettings", "RetrySettings", "HostLimitSettings",
    "CircuitSettings", "CredentialSettings", "ParentProxySettings", "CacheSettings",
    "MemoryFrontSettings", "OCISettings", "MavenSettings", "GitHubSettings", "LoggingSettings",
    "split_hostport", "default_config_text", "MirrorSettings", "MirrorOCISettings",
    "MirrorTLSSettings", "SharedSettings", "S3Settings", "settings_view", "settings_digest",
    "LifecycleSettings", "PrefetchSettings", "PrefetchArtifactSettings", "PrefetchSource",
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
    lifecycle: LifecycleSettings = LifecycleSettings()
    #: where the operator's file came from ("<embedded default>" when none); set by the loader
    source: str = field(default="<embedded default>", metadata=INTERNAL)
    #: key path → where its value came from ("flag --data-dir", "env TRIVY_GATEWAY_DATA_DIR",
    #: "/etc/gw.yaml line 4"); set by the loader so start-up errors blame the right place
    origins: Mapping[str, str] = field(default_factory=dict, metadata=INTERNAL, compare=False,
                                       repr=False)
    #: values of the config file that an env variable overrode with another value; the gateway
    #: warns about each at start (a forgotten TRIVY_GATEWAY_DATA_DIR must not pass silently)
    overridden: tuple[str, ...] = field(default=(), metadata=INTERNAL, compare=False)

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

    def origin(self, path: str) -> str:
        """Where the value at ``path`` came from, for messages: ``server.data_dir (flag --data-dir)``."""
        for prefix in _prefixes(path):
            if prefix in self.origins:
                return self.origins[prefix]
        return "<embedded default>"

    def error(self, path: str, message: str) -> ConfigError:
        """A :class:`ConfigError` for ``path`` blamed on where its value came from (file and
        line, env variable or flag), for problems found after loading (a file the key names is
        missing or does not load), so they read like every other configuration error."""
        where = self.origin(path)
        source, sep, line = where.rpartition(" line ")
        if sep and line.isdigit():
            return ConfigError(path, message, source, int(line))
        return ConfigError(path, message, where)


def _prefixes(path: str) -> list[str]:
    """``a.b[0].c`` → ``[a.b[0].c, a.b[0], a.b, a]``: from the most to the least specific."""
    out = [path]
    while True:
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            return out
        path = path[:cut]
        out.append(path)


def settings_view(obj: Any) -> Any:
    """Plain JSON-able data of the effective settings, without secrets and loader fields
    (``check-config --print``, the config digest)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: settings_view(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, (tuple, list)):
        return [settings_view(x) for x in obj]
    if isinstance(obj, Mapping):
        return {k: settings_view(v) for k, v in obj.items()}
    return obj


def settings_digest(settings: "Settings") -> str:
    """A short digest naming a configuration (secrets excluded): which config is active."""
    text = json.dumps(settings_view(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


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


def _yaml_error(exc: yaml.YAMLError, source: str) -> ConfigError:
    """PyYAML's problem with its line, keeping its context ("while scanning a quoted scalar")."""
    mark = getattr(exc, "problem_mark", None)
    where = f"column {mark.column + 1}: " if mark else ""
    message = f"not valid YAML: {where}{getattr(exc, 'problem', None) or exc}"
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        message += f" ({context}" + (f" started at line {cmark.line + 1}, column "
                                     f"{cmark.column + 1}" if cmark else "") + ")"
    return ConfigError("", message, source, mark.line + 1 if mark else None)


def _marks(node: yaml.Node, path: str, out: dict[str, int]) -> None:
    """Record the 1-based line of every key path under ``node`` (PyYAML's marks)."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = str(key_node.value)
            for name in {key, key.replace("-", "_")}:
                sub = f"{path}.{name}" if path else name
                out[sub] = key_node.start_mark.line + 1
            _marks(value_node, f"{path}.{key.replace('-', '_')}" if path else key.replace("-", "_"),
                   out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[f"{path}[{i}]"] = item.start_mark.line + 1
            _marks(item, f"{path}[{i}]", out)


def _read_yaml(text: str, source: str, marks: Optional[dict[str, int]] = None) -> dict:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"the top level must be a mapping, got {type(data).__name__}", source)
    if marks is not None:
        _marks(node, "", marks)
    return data


def _leaf_paths(data: Mapping, path: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        sub = f"{path}.{key}" if path else str(key)
        out.extend(_leaf_paths(value, sub) if isinstance(value, Mapping) else [sub])
    return out


def _locate(exc: ConfigError, origins: Mapping[str, str], file_lines: Mapping[str, int],
            source: str) -> ConfigErrors:
    """Give every collected problem the source (flag, env, file + line) its value came from."""
    located = []
    for err in exc.errors:
        where, line = "<embedded default>", None
        for prefix in _prefixes(err.path) if err.path else []:
            if prefix in origins:
                where = origins[prefix].split(" line ")[0]
                line = file_lines.get(prefix) if where == source else None
                break
        located.append(ConfigError(err.path, err.message, where, line))
    located.sort(key=lambda e: (e.source, e.line or 0))
    return ConfigErrors(located)


def _read_secret(settings: Settings, env_name: Optional[str], file_key: str,
                 file_name: Optional[str], env: Mapping[str, str]) -> str:
    """The secret from ``file_name`` (set at ``file_key``), else from ``env_name``; an unreadable
    file is an error naming the key, where it was set, the path and the OS error."""
    if file_name:
        try:
            return Path(file_name).read_text("utf-8").strip()
        except OSError as exc:
            raise settings.error(file_key, f"cannot read {file_name}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise settings.error(file_key, f"{file_name} is not UTF-8 text") from None
    if env_name:
        return env.get(env_name, "")
    return ""


def _resolve_secrets(settings: Settings, env: Mapping[str, str]) -> Settings:
    server = settings.server
    token = _read_secret(settings, server.admin_token_env, "server.admin_token_file",
                         server.admin_token_file, env)
    if server.admin_token_file and not token:
        raise settings.error("server.admin_token_file", f"{server.admin_token_file} is empty")
    if token:
        settings = dataclasses.replace(settings, server=dataclasses.replace(
            server, admin_token=token))
    auth = settings.proxy.auth
    if auth.enabled:
        password = _read_secret(settings, auth.password_env, "proxy.auth.password_file",
                                auth.password_file, env)
        if not password:
            raise ConfigError("proxy.auth", f"proxy auth is enabled but {auth.password_env} is "
                              "empty and no password_file is set", settings.source)
        settings = dataclasses.replace(settings, proxy=dataclasses.replace(
            settings.proxy, auth=dataclasses.replace(auth, password=password)))
    tls = settings.tls
    if tls.ca_key_password_file or tls.ca_key_password_env:
        secret = _read_secret(settings, tls.ca_key_password_env, "tls.ca_key_password_file",
                              tls.ca_key_password_file, env)
        if not secret:
            raise ConfigError("tls.ca_key_password_env", f"{tls.ca_key_password_env} is empty "
                              "and no ca_key_password_file is set", settings.source)
        settings = dataclasses.replace(settings, tls=dataclasses.replace(
            tls, ca_key_password=secret))
    creds = []
    for i, cred in enumerate(settings.upstream.credentials):
        secret = _read_secret(settings, cred.secret_env, f"upstream.credentials[{i}].secret_file",
                              cred.secret_file, env)
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
    # origins, lowest precedence first so a later layer overwrites: file → env → flag
    origins: dict[str, str] = {}
    file_lines: dict[str, int] = {}
    if config_path:
        try:
            text = Path(config_path).read_text("utf-8")
        except OSError as exc:
            raise ConfigError("", f"cannot read config file: {exc.strerror}", config_path) from None
        data = _deep_merge(data, _read_yaml(text, config_path, file_lines))
        source = config_path
        origins.update({p: f"{config_path} line {n}" for p, n in file_lines.items()})
    env_layer: dict[str, dict[str, Any]] = {}
    overridden = []
    for name, (section, key) in ENV_OVERRIDES.items():
        if env.get(name):
            env_layer.setdefault(section, {})[key] = env[name]
            path = f"{section}.{key}"
            file_value = (data.get(section) or {}).get(key)
            if path in file_lines and str(file_value) != env[name]:
                overridden.append(f"{path}: env {name}={env[name]!r} overrides {file_value!r} "
                                  f"of {origins[path]}")
            origins[path] = f"env {name}"
    data = _deep_merge(data, env_layer)
    if overrides:
        flags = {k: dict(v) for k, v in overrides.items() if v}
        data = _deep_merge(data, flags)
        # CLI flags are named after their key: server.data_dir ← --data-dir
        origins.update({p: "flag --" + p.rsplit(".", 1)[-1].replace("_", "-")
                        for p in _leaf_paths(flags)})
    try:
        settings = from_mapping(Settings, data)
    except ConfigError as exc:
        raise _locate(exc, origins, file_lines, source) from None
    settings = dataclasses.replace(settings, source=source, overridden=tuple(overridden),
                                   origins=types.MappingProxyType(origins))
    return _resolve_secrets(settings, env)
