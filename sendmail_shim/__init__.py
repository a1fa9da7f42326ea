"""sendmail-shim: outbound mail control for shared web hosting.

Kept empty on purpose: the sendmail front end imports this package on every
PHP mail() call, so nothing may be imported here.
"""

__version__ = "0.1.0"
