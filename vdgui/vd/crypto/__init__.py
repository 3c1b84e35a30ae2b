"""Disk encryption shared by the backends (issue #17; docs/design-encryption.md): primitives
(the one place cryptography and argon2 are imported), sector ciphers with their IV generators,
LUKS1/LUKS2 headers and keyslots. Imports no format module."""
