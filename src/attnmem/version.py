"""The version of attnmem, recorded in every results row (a changed version redoes a row on resume)."""

__version__ = "0.1.0"
