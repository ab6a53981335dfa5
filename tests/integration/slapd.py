
"""Start a real OpenLDAP slapd (Debian's `slapd` package) on loopback for integration tests.

Each instance lives in its own folder: a `slapd.conf` written here (mdb backend, suffix
dc=example,dc=com, a root DN for changes, a service account that may search), its database,
loaded offline with `slapadd` from an LDIF whose passwords are `slappasswd` {SSHA} hashes, and
its log. slapd runs in the foreground (`-d`, so it never forks) on 127.0.0.1 high ports: ldap://
always, and ldaps:// plus StartTLS when given a certificate. `stop()` and `start()` again keep
the data, for the outage tests. slapd missing is an error, never a skip: CI installs it
(`DEBIAN_FRONTEND=noninteractive apt-get install -y slapd ldap-utils`; the package is only
used for its binaries, the system's own slapd is never started).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import free_port

SUFFIX = "dc=example,dc=com"
PEOPLE = f"ou=people,{SUFFIX}"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "root secret"
SERVICE_DN = f"cn=relay,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "service secret"

POLICY_DN = f"cn=default,{SUFFIX}"

SCHEMAS = ("core", "cosine", "inetorgperson")
TOOLS = ("slapd", "slapadd", "slappasswd", "ldappasswd", "ldapmodify")
INSTALL_HINT = ("Install it with: DEBIAN_FRONTEND=noninteractive apt-get install -y "
                "slapd ldap-utils")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


class SlapdError(RuntimeError):
    """slapd or its tools are missing, or slapd did not start."""


@dataclass(frozen=True)
class Person:
    """An inetOrgPerson under ou=people: uid=<uid>, with `mail` and a password."""

    uid: str
    mail: str
    password: str

    @property
    def dn(self) -> str:
        return f"uid={self.uid},{PEOPLE}"


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if not found:
        raise SlapdError(f"{name} not found on PATH. {INSTALL_HINT}")
    return found


def require_slapd() -> None:
    for name in TOOLS:
        tool(name)


def ssha(password: str) -> str:
    out = subprocess.run([tool("slappasswd"), "-h", "{SSHA}", "-s", password],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip()


def ldif(people: list[Person], ppolicy: bool = False) -> str:
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n",
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=services,{SUFFIX}\nobjectClass: organizationalUnit\nou: services\n",
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: relay\nuserPassword: {ssha(SERVICE_PASSWORD)}\n",
    ]
    if ppolicy:     # the default policy: lockout enforced (pwdAccountLockedTime is obeyed)
        entries.append(f"dn: {POLICY_DN}\nobjectClass: organizationalRole\nobjectClass: pwdPolicy\n"
                       f"cn: default\npwdAttribute: userPassword\npwdLockout: TRUE\n")
    for p in people:
        entries.append(f"dn: {p.dn}\nobjectClass: inetOrgPerson\nuid: {p.uid}\ncn: {p.uid}\n"
                       f"sn: {p.uid}\nmail: {p.mail}\nuserPassword: {ssha(p.password)}\n")
    return "\n".join(entries)


def config(workdir: Path, tls: tuple[Path, Path] | None, ppolicy: bool = False) -> str:
    lines = [f"include /etc/ldap/schema/{name}.schema" for name in SCHEMAS]
    lines += [
        "modulepath /usr/lib/ldap",
        "moduleload back_mdb",
        *(["moduleload ppolicy"] if ppolicy else []),
        f"pidfile {workdir / 'slapd.pid'}",
        f"argsfile {workdir / 'slapd.args'}",
    ]
    if tls is not None:
        lines += [f"TLSCertificateFile {tls[0]}", f"TLSCertificateKeyFile {tls[1]}"]
    lines += [
        "database mdb",
        "maxsize 16777216",
        f'suffix "{SUFFIX}"',
        f'rootdn "{ROOT_DN}"',
        f"rootpw {ssha(ROOT_PASSWORD)}",
        f"directory {workdir / 'data'}",
        *(['overlay ppolicy', f'ppolicy_default "{POLICY_DN}"', "ppolicy_use_lockout"]
          if ppolicy else []),
        "access to attrs=userPassword by self write by anonymous auth by * none",
        f'access to * by dn.exact="{SERVICE_DN}" read by self read by * none',
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Slapd:
    workdir: Path
    port: int
    tls_port: int | None
    ca_file: Path | None = None                            # what clients trust, for the tests
    process: subprocess.Popen | None = None
    process_rc: int | None = None                          # exit status of the last stop
    starts: list[float] = field(default_factory=list)     # seconds each start took

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        assert self.tls_port is not None, "started without a certificate"
        return f"ldaps://127.0.0.1:{self.tls_port}"

    @property
    def conf(self) -> Path:
        return self.workdir / "slapd.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / "slapd.log"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start slapd and wait until every listener accepts connections."""
        assert self.process is None, "already running"
        urls = [self.url] + ([self.ldaps_url] if self.tls_port else [])
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            # -d 256 (stats): one line per connection and operation, and no fork
            self.process = subprocess.Popen(
                [tool("slapd"), "-f", str(self.conf), "-h", " ".join(urls), "-d", "256"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        ports = [self.port] + ([self.tls_port] if self.tls_port else [])
        deadline = began + START_TIMEOUT
        while not all(_accepts(port) for port in ports):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SlapdError(f"slapd did not start (exit {self.process_rc}); its log:\n"
                                 + self.log_text()[-3000:])
            time.sleep(0.02)
        self.starts.append(time.monotonic() - began)

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not exited after STOP_TIMEOUT; then ports are closed."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.process_rc = process.returncode

    def set_password(self, person: Person, password: str) -> None:
        """Change a password as an administrator would, with ldappasswd over the network."""
        _run([tool("ldappasswd"), "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD,
              "-s", password, person.dn])

    def lock(self, person: Person) -> None:
        """Disable an account as an OpenLDAP administrator does with ppolicy: a lock time of
        000001010000Z locks it until an administrator removes it."""
        self.modify(f"dn: {person.dn}\nchangetype: modify\nadd: pwdAccountLockedTime\n"
                    f"pwdAccountLockedTime: 000001010000Z\n")

    def modify(self, changes: str) -> None:
        """Apply an LDIF of changes with ldapmodify as the root DN."""
        _run([tool("ldapmodify"), "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD],
             changes)


def start_slapd(workdir: Path, people: list[Person], tls: tuple[Path, Path] | None = None,
                ca_file: Path | None = None, ppolicy: bool = False) -> Slapd:
    """A running slapd in `workdir` holding `people`; `tls` is (certificate chain, key), and
    `ca_file` the CA certificate clients should trust (only remembered, for the tests). With
    `ppolicy`, the password policy overlay with a default policy that enforces locks, and
    `ppolicy_use_lockout` (so a bind to a locked account says so in its response control)."""
    require_slapd()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir()
    (workdir / "slapd.conf").write_text(config(workdir, tls, ppolicy))
    (workdir / "people.ldif").write_text(ldif(people, ppolicy))
    _run([tool("slapadd"), "-q", "-f", str(workdir / "slapd.conf"),
          "-l", str(workdir / "people.ldif")])
    instance = Slapd(workdir, free_port(), free_port() if tls else None, ca_file)
    instance.start()
    return instance


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _run(argv: list[str], stdin: str | None = None) -> None:
    out = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise SlapdError(f"{Path(argv[0]).name} failed (exit {out.returncode}): "
                         f"{(out.stderr or out.stdout).strip()}")
