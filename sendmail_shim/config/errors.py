"""The one error of configuration loading.

Trusts: nothing.  Guarantees: the text names the file, the key path and what
is wrong, ready for the operator (the commands exit 78 on it).  It is a
:class:`wire.paths.SettingsError`, the front end's own error for the two keys
it reads without YAML, so code that catches either sees both.
"""

from __future__ import annotations

from sendmail_shim.wire.paths import SettingsError


class ConfigError(SettingsError):
    """A configuration file that cannot be used; the text names file and key."""
