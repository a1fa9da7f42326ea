"""The Postfix policy service of the relay: ``sendmail-shim-admin policy serve``.

``codec`` reads and writes the protocol, ``decide`` answers one request from
the configuration and the state, ``server`` listens (asyncio, Unix or TCP).
"""
