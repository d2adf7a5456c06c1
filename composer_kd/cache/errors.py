"""The error raised when recorded teacher outputs do not belong to the fit at hand.

It has a module of its own because both the storage (a file of the wrong shape) and the cache (a fingerprint that
differs) raise it, and the fingerprint depends on the storage's format version: here it sits below both.
"""

from __future__ import annotations

__all__ = ['StaleTeacherCacheError']


class StaleTeacherCacheError(ValueError):
    """Recorded teacher outputs belong to another teacher, dataset or setting, and are not used.

    Raised by :class:`.TeacherCache` with the path and what differs; a ``ValueError``, so code that treats bad
    input generally still catches it.

    Args:
        message (str): What was refused, and why.

    Example:
        .. testcode::

            from composer_kd import StaleTeacherCacheError

            try:
                raise StaleTeacherCacheError('cache/ was recorded for another teacher')
            except ValueError as error:
                assert 'another teacher' in str(error)
    """
