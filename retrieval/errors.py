"""Typed exceptions raised by the library; the CLI turns each into a one-line error."""


class MMSearchError(Exception):
    """Base class of every error mmsearch expects and reports to a user."""


class PathNotFound(MMSearchError):
    """A path given to index or query does not exist or cannot be read."""


class UnsupportedFile(MMSearchError):
    """A file given explicitly is neither an image nor a text corpus."""


class ModelUnavailable(MMSearchError):
    """Model weights or config cannot be loaded (not cached, offline, bad checkpoint)."""


class ModelMismatch(MMSearchError):
    """The index was built by another model than the one asked for."""


class ModelInUse(MMSearchError):
    """A model the index cannot do without (its default) was asked to be removed."""


class IndexInUse(MMSearchError):
    """Another process holds the write lock of this index."""


class IndexNotFound(MMSearchError):
    """No index exists at the given location."""


class IndexReadOnly(MMSearchError):
    """The index directory cannot be written."""


class EmptyIndex(MMSearchError):
    """The index holds no item of the kind a query asks for."""


class BadQuery(MMSearchError):
    """A query cannot be run: unreadable query image, empty text, bad option."""


class IndexDamaged(MMSearchError):
    """The index database is not an SQLite database of mmsearch's, or is corrupt."""


class IndexTooNew(MMSearchError):
    """The index was written by a newer mmsearch (database migration or vector-file format)."""


class DeviceUnavailable(ModelUnavailable):
    """The device asked for is unknown, or not present on this machine."""


class NothingToIndex(MMSearchError):
    """`index` without paths on an index that has no folders to re-scan yet."""
