"""Squid (Debian ``squid-openssl``) as a reference for small hits: what users run today.

ssl_bump of every CONNECT with leaves minted from the benchmark's throw-away CA, a rock store
plus the memory cache, the emulated upstream reached as a TLS ``cache_peer`` (``originserver``;
its port is not 443), an access log to a file (the gateway writes one too). One worker. Own
directory, config and pid file; ``-N`` (no daemon), stopped by its pid.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from procs import process_tree, program_version, stop_process, wait_port

CERTGEN = "/usr/lib/squid/security_file_certgen"

SQUID_CONF = """\
workers 1
http_port 127.0.0.1:{port} ssl-bump generate-host-certificates=on dynamic_cert_mem_cache_size=4MB tls-cert={ca_cert} tls-key={ca_key}
sslcrtd_program {certgen} -s {dir}/ssl_db -M 4MB
sslcrtd_children 2 startup=1 idle=1
ssl_bump bump all
debug_options ALL,1
http_access allow all
cache_peer 127.0.0.1 parent {upstream_port} 0 no-query no-digest originserver tls tls-cafile={upstream_ca} tls-domain={upstream_host} name=world
cache_peer_access world allow all
never_direct allow all
cache_mem 64 MB
maximum_object_size_in_memory 1 MB
cache_dir rock {dir}/rock 256
refresh_pattern . 60 100% 1440 override-expire override-lastmod ignore-reload ignore-no-store ignore-private
pid_filename {dir}/squid.pid
access_log stdio:{dir}/access.log
cache_log {dir}/cache.log
cache_store_log none
coredump_dir {dir}
cache_effective_user {user}
shutdown_lifetime 1 seconds
"""


class Squid:
    def __init__(self, ca_cert: str, ca_key: str, upstream_port: int, upstream_ca: str,
                 upstream_host: str, port: int) -> None:
        # its own directory, reachable by the unprivileged user Squid switches to (the
        # benchmark's temp dir is private), with copies of the files Squid reads after that
        self.dir = Path(tempfile.mkdtemp(prefix="trivy-gateway-bench-squid-"))
        self.dir.chmod(0o755)
        self.port = port
        files = {}
        for name, src in (("ca.pem", ca_cert), ("ca.key", ca_key), ("upstream-ca.pem", upstream_ca)):
            shutil.copyfile(src, self.dir / name)
            files[name] = str(self.dir / name)
        self.conf_args = dict(ca_cert=files["ca.pem"], ca_key=files["ca.key"],
                              upstream_port=upstream_port, upstream_ca=files["upstream-ca.pem"],
                              upstream_host=upstream_host)
        self.proc: Optional[subprocess.Popen] = None

    @staticmethod
    def binary() -> Optional[str]:
        return shutil.which("squid") or (shutil.which("squid", path="/usr/sbin"))

    @classmethod
    def version(cls) -> str:
        return program_version(cls.binary())

    def start(self) -> "Squid":
        b = self.binary()
        if not b:
            raise RuntimeError("squid not found: apt-get install -y squid-openssl")
        conf = self.dir / "squid.conf"
        conf.write_text(SQUID_CONF.format(port=self.port, dir=self.dir, certgen=CERTGEN,
                                          user="proxy", **self.conf_args))
        subprocess.run([CERTGEN, "-c", "-s", str(self.dir / "ssl_db"), "-M", "4MB"],
                       check=True, capture_output=True, timeout=60)
        shutil.chown(self.dir, "proxy")
        for p in self.dir.rglob("*"):
            shutil.chown(p, "proxy")
        subprocess.run([b, "-N", "-z", "-f", str(conf)], capture_output=True, timeout=120)
        self._log = open(self.dir / "stderr.log", "wb")
        self.proc = subprocess.Popen([b, "-N", "-f", str(conf)], stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_port(self.port)
        except RuntimeError:
            self.stop()
            raise RuntimeError("squid did not start: " + self._tail())
        time.sleep(1.0)                         # the rock store and helpers come up
        return self

    def _tail(self) -> str:
        out = ""
        for name in ("stderr.log", "cache.log"):
            p = self.dir / name
            if p.exists():
                out += p.read_text(errors="replace")[-1500:]
        return out

    def pids(self) -> list[int]:
        """The master and its kids (the worker, the disker, the certificate helpers)."""
        return process_tree(self.proc)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGTERM, 15)
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
