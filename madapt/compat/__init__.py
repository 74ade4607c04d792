"""The one place each fast-moving library's internals are touched: private names, module paths below a
library's public API, and attributes its documentation does not promise. One module per library, each
saying which versions it was checked against, so an upgrade is a one-file change.

May import: the library it fences (lazily where the library is heavy) and nothing of madapt's.
"""
