"""Entry point for ``python -m metal_guard`` in the installed package.

The wheel installs ``metal_guard.py`` as ``metal_guard/__init__.py`` (so that the
package can carry ``py.typed``); this file becomes ``metal_guard/__main__.py``.
Running the single file directly (``python metal_guard.py``) uses the module's own
``if __name__ == "__main__"`` block instead.
"""

from __future__ import annotations

import sys

from metal_guard import main

if __name__ == "__main__":
    sys.exit(main())
