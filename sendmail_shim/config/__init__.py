"""The daemon's and the admin command's configuration: one YAML file, checked whole.

The front end never imports this package (it reads its two keys with
``wire.paths``); everything else imports the names below from here, not from
the modules inside.
"""

from sendmail_shim.config.errors import ConfigError
from sendmail_shim.config.isolated import load_config_isolated
from sendmail_shim.config.loader import load_config, parse_config
from sendmail_shim.config.model import (
    ADMIN_KEYS,
    ADMIN_SITE,
    DEFAULT_POOL,
    FIREWALL_KEYS,
    FROM_ACTIONS,
    LOG_KEYS,
    LOG_TARGETS,
    OUTBREAK_KEYS,
    QUOTA_KEYS,
    RELAY_KEYS,
    RESOLVER_KEYS,
    RETRY_KEYS,
    SENDER_ACTIONS,
    SITE_KEYS,
    TLS_MODES,
    TOP_KEYS,
    Admin,
    Config,
    Firewall,
    LocalTransport,
    OutbreakRules,
    Pool,
    Quota,
    Relay,
    RelayLogin,
    RetryPolicy,
    Scan,
    Site,
)

__all__ = [
    "ADMIN_KEYS", "ADMIN_SITE", "DEFAULT_POOL", "FIREWALL_KEYS", "FROM_ACTIONS", "LOG_KEYS",
    "LOG_TARGETS",
    "OUTBREAK_KEYS", "QUOTA_KEYS", "RELAY_KEYS", "RESOLVER_KEYS", "RETRY_KEYS",
    "SENDER_ACTIONS", "SITE_KEYS", "TLS_MODES", "TOP_KEYS", "Admin", "Config", "ConfigError",
    "Firewall", "LocalTransport", "OutbreakRules", "Pool", "Quota", "Relay", "RelayLogin",
    "RetryPolicy", "Scan", "Site", "load_config", "load_config_isolated", "parse_config",
]
