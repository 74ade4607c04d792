"""pyarrow internals madapt reaches: the options an S3 filesystem was built with. Checked against pyarrow 26.0.

pyarrow has no public accessor for them; `__reduce__` is how it pickles one (`S3FileSystem(**options)`).
"""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs


def s3_options(fs: pafs.S3FileSystem) -> dict[str, Any]:
    """The keyword arguments that rebuild `fs`."""
    return dict(fs.__reduce__()[1][0])
