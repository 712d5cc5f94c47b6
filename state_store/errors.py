"""Typed errors of the state store. Each message says what is wrong and what to do about it."""

from __future__ import annotations


class StateStoreError(Exception):
    """Base class of every error raised by `state_store`."""


# ---- codec ------------------------------------------------------------------------------------
class StateCodecError(StateStoreError, ValueError):
    """Bytes are not a valid encoded state for this model, or a state cannot be encoded as asked."""


class StateFormatError(StateCodecError):
    """The bytes are not a retserve state at all (truncated, random, a pickle, another format)."""


class StateVersionError(StateCodecError):
    """The state was written in a format version this code does not read."""


class ModelMismatchError(StateCodecError):
    """The state was made by another model (other weights or other shapes) than the one loaded."""


class CorruptStateError(StateCodecError):
    """The state is well framed but its content is invalid (shape, dtype, non-finite values...)."""


# ---- store ------------------------------------------------------------------------------------
class InvalidKeyError(StateStoreError, ValueError):
    """A namespace, session id, key prefix or list cursor is malformed."""


class StoreUnavailable(StateStoreError):
    """The backend (Redis) cannot be reached or did not answer in time; retry later."""


class ValueTooLargeError(StateStoreError, ValueError):
    """A value is larger than the store accepts."""


class VersionConflictError(StateStoreError):
    """An optimistic put/delete named a version that is no longer the stored one."""

    def __init__(self, message: str, *, expected: int, current: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.current = current  # 0 = the session does not exist


class LockError(StateStoreError):
    """Base of the lease-lock errors."""


class LockHeldError(LockError):
    """The session is leased by another owner: wait for its release or expiry."""

    def __init__(self, message: str, *, expires_in: float | None) -> None:
        super().__init__(message)
        self.expires_in = expires_in  # seconds until the other owner's lease expires (None: unknown)


class LockNotHeldError(LockError):
    """The caller's lease is not (or no longer) the one holding the session."""
