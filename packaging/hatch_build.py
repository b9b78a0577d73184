"""Hatch build hook: lay the single-module library out as a typed package.

Regular wheels install ``metal_guard.py`` as ``metal_guard/__init__.py`` next to
``py.typed`` (PEP 561 cannot mark a bare module as typed) and ``__main__.py``. The
mapping lives in ``pyproject.toml`` under this hook's ``package-files`` key.

Editable installs get none of it: hatchling copies force-included files into
site-packages even for editable wheels, and that copy would shadow the working
tree. They only put the repository root on ``sys.path`` (``dev-mode-dirs``), so
``import metal_guard`` always reads the working copy of ``metal_guard.py``.
"""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class PackageLayoutHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable":
            return
        files = self.config.get("package-files")
        if not isinstance(files, dict) or not files:
            raise ValueError("[tool.hatch.build.targets.wheel.hooks.custom] needs package-files")
        build_data["force_include"].update(files)
