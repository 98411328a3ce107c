"""Settings of `nbdproxy serve`: defaults < <conf-dir>/nbdproxy.conf < conf.d/*.conf < flags.

INI files have one section, [nbdproxy], whose keys are the long flags with '_' for '-'.
"""

import configparser
import glob
import os

from .errors import ConfigError

SECTION = "nbdproxy"

# name: (type, default). Types convert the text of an INI value or a flag.
SETTINGS = {
    "control_socket": (str, "/run/nbdproxy/control.sock"),
    "control_group": (str, ""),
    "local_socket": (str, "@/org/nbdproxy"),
    "host": (str, "::"),
    "port": (int, 54322),
    "cert_file": (str, ""),
    "key_file": (str, ""),
    "no_tls": (bool, False),
    "log_level": (str, "INFO"),
    "buffer_size": (int, 8 * 1024**2),
    "max_connections": (int, 64),
    "nbd_connections": (int, 8),
    "nbd_request_size": (int, 512 * 1024),
    "nbd_timeout": (int, 300),
    "nbd_idle_timeout": (int, 5),
    "file_direct": (bool, True),
    "nbd_connect_timeout": (int, 10),
    "nbd_tls_certificates": (str, ""),
    "run_dir": (str, "/run/nbdproxy/images"),
    "max_tickets": (int, 10_000),
    "remove_timeout": (int, 60),
    "stop_timeout": (int, 30),
    "initial_timeout": (int, 60),
    "checksum_memory": (int, 256 * 1024**2),
    "backend_ca_file": (str, ""),
    "backend_timeout": (int, 300),
}

MAX_TIMEOUT = (2**31 - 1) // 1000      # 24.8 days

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Config:
    def __init__(self, values):
        self.__dict__.update(values)

    @property
    def local_address(self):
        """The local socket as bind() takes it: a path, "\\0NAME" for @NAME, or None when off."""
        if self.local_socket in ("", "none"):
            return None
        if self.local_socket.startswith("@"):
            return "\0" + self.local_socket[1:]
        return self.local_socket


def _convert(name, kind, text):
    if kind is bool:
        if isinstance(text, bool):
            return text
        lowered = str(text).strip().lower()
        if lowered in ("1", "yes", "true", "on"):
            return True
        if lowered in ("0", "no", "false", "off"):
            return False
        raise ConfigError(f"{name}: expecting a boolean, not {text!r}")
    if kind is int:
        try:
            return int(text)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expecting an integer, not {text!r}") from None
    return str(text).strip()


def conf_files(conf_dir):
    files = [os.path.join(conf_dir, "nbdproxy.conf")]
    files += sorted(glob.glob(os.path.join(conf_dir, "conf.d", "*.conf")))
    return [f for f in files if os.path.isfile(f)]


def load(conf_dir, flags):
    """Merge defaults, the INI files under conf_dir and the flags given (None = not given)."""
    values = {name: default for name, (_, default) in SETTINGS.items()}
    parser = configparser.ConfigParser(interpolation=None)
    for path in conf_files(conf_dir):
        try:
            with open(path, "rb") as f:
                # Decoded whole, so that a bad byte's offset is the file's.
                parser.read_string(f.read().decode("utf-8"), path)
        except UnicodeDecodeError as e:
            raise ConfigError(f"cannot read {path}: not UTF-8 text: byte "
                              f"0x{e.object[e.start]:02x} at offset {e.start}") from None
        except (OSError, configparser.Error) as e:
            # configparser's messages span lines; the error is one line (issue 2, point 3).
            raise ConfigError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    if parser.has_section(SECTION):
        for key, text in parser.items(SECTION):
            if key not in SETTINGS:
                raise ConfigError(f"unknown setting {key!r} in [{SECTION}] of {conf_dir}")
            values[key] = _convert(key, SETTINGS[key][0], text)
    for key, value in flags.items():
        if value is not None:
            values[key] = _convert(key, SETTINGS[key][0], value)
    check(values)
    return Config(values)


def check(values):
    if not -1 <= values["port"] <= 65535:
        raise ConfigError(f"port: {values['port']} is not -1, 0 or a TCP port")
    size = values["buffer_size"]
    if size < 256 * 1024 or size > 1024**3 or size % 4096:
        raise ConfigError(f"buffer_size: {size} must be 256 KiB to 1 GiB, a multiple of 4096")
    if values["max_connections"] < 1:
        raise ConfigError("max_connections: must be at least 1")
    if values["max_tickets"] < 1:
        raise ConfigError("max_tickets: must be at least 1")
    ca_dir = values["nbd_tls_certificates"]
    if ca_dir and not os.path.isfile(os.path.join(ca_dir, "ca-cert.pem")):
        # libnbd reads the directory only when a connection is made: say it now.
        raise ConfigError(f"nbd_tls_certificates: no ca-cert.pem in {ca_dir!r}")
    if not 1 <= values["nbd_connections"] <= 64:
        raise ConfigError("nbd_connections: must be from 1 to 64")
    request = values["nbd_request_size"]
    if request < 4096 or request > 32 * 1024**2 or request % 4096:
        raise ConfigError(f"nbd_request_size: {request} must be 4 KiB to 32 MiB, "
                          "a multiple of 4096")
    if values["log_level"].upper() not in LOG_LEVELS:
        raise ConfigError(f"log_level: {values['log_level']!r} is not one of {LOG_LEVELS}")
    values["log_level"] = values["log_level"].upper()
    for key in ("remove_timeout", "stop_timeout", "nbd_timeout", "nbd_idle_timeout",
                "nbd_connect_timeout", "backend_timeout"):
        # poll(2) takes milliseconds in a C int: past MAX_TIMEOUT seconds it overflows.
        if not 0 <= values[key] <= MAX_TIMEOUT:
            raise ConfigError(f"{key}: must be from 0 to {MAX_TIMEOUT} seconds")
    if values["checksum_memory"] < 16 * 1024**2:
        # Less could never hold one block of the largest block_size a checksum may ask for.
        raise ConfigError(f"checksum_memory: {values['checksum_memory']} must be at least 16 MiB")
    if not 1 <= values["initial_timeout"] <= 3600:
        raise ConfigError("initial_timeout: must be from 1 to 3600 seconds")
    if not os.path.isabs(values["run_dir"]) or len(values["run_dir"].encode()) > 80:
        # Its sockets' paths (run_dir + 22 bytes) must fit a unix socket address (107 bytes).
        raise ConfigError(f"run_dir: {values['run_dir']!r} must be an absolute path of at "
                          "most 80 bytes")
    if values["local_socket"] == "@":
        # bind() to an empty abstract name autobinds a random one, which no client could know.
        raise ConfigError("local_socket: '@' needs a name after it, as in @/org/nbdproxy")
    if values["port"] != -1 and not values["no_tls"]:
        if not (values["cert_file"] and values["key_file"]):
            raise ConfigError("the TCP service needs cert_file and key_file for TLS "
                              "(or no_tls, or port -1 to turn it off)")
