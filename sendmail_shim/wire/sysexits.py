"""Exit codes from <sysexits.h>, the only statuses the front end returns.

Callers (PHP mail(), PHPMailer, cron) read only "zero or not"; PHP 8.5 also
treats EX_TEMPFAIL as success-with-warning.  Stdlib-free constants so that the
hot path pays nothing for them.
"""

EX_OK = 0
EX_USAGE = 64  # bad command line
EX_DATAERR = 65  # bad message: too large, no recipients found
EX_NOUSER = 67  # addressee unknown
EX_UNAVAILABLE = 69  # service unavailable
EX_SOFTWARE = 70  # internal error
EX_OSERR = 71  # system error (fork, out of memory)
EX_CANTCREAT = 73  # cannot create output file
EX_IOERR = 74  # input/output error
EX_TEMPFAIL = 75  # try again later; nothing was accepted
EX_PROTOCOL = 76  # remote error in protocol
EX_NOPERM = 77  # permission denied: site refused or suspended
EX_CONFIG = 78  # configuration error
